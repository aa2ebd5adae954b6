"""Tiny randomly initialised models for offline tests: the builders live in `threed.random_models`
(examples use them too); this module keeps the names tests import."""

from threed.random_models import (  # noqa: F401
    CLIP_CONTEXT,
    CLIP_VOCAB,
    build_clip_tokenizer,
    build_random_sd,
    build_tiny_sd,
    build_tiny_taesd,
    tiny_text_encoder_config,
    write_clip_bpe_files,
)


def build_tiny_mvdream(folder, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny MVDream checkpoint in the official file layout and its config beside it (the keys and shapes
    tests/data/mvdream/make_keys.py recorded from the reference at a tiny size): `folder`/mvdream-tiny.pt and
    mvdream-tiny.yaml. Returns the .pt's path."""
    from pathlib import Path

    from threed.random_models import write_random_mvdream

    data = Path(__file__).parent / "data" / "mvdream"
    return write_random_mvdream(Path(folder) / "mvdream-tiny.pt", data / "tiny-keys.txt.gz", data / "tiny-model.yaml",
                                seed=seed)
