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


def build_tiny_mvdream(folder: "Path", seed: int = 0) -> "Path":
    """A tiny MVDream checkpoint in the official file layout (random weights for the keys and shapes that
    tests/data/mvdream/make_keys.py recorded from the reference at a tiny size) and its config beside it:
    `folder`/mvdream-tiny.pt and mvdream-tiny.yaml. Norm weights are 1 + noise, the DDPM betas the real
    ones (the loader checks them); everything else small noise. Returns the .pt's path."""
    import gzip
    import shutil
    from pathlib import Path

    import torch

    data = Path(__file__).parent / "data" / "mvdream"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    with gzip.open(data / "tiny-keys.txt.gz", "rt") as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            dims = [int(x) for x in shape.split("x")] if shape else []
            t = 0.05 * torch.randn(dims, generator=g)
            if key.endswith(".weight") and len(dims) == 1:  # GroupNorm / LayerNorm scales
                t += 1.0
            state[key] = t
    state["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64).pow(2).float()
    path = folder / "mvdream-tiny.pt"
    torch.save(state, path)
    shutil.copy(data / "tiny-model.yaml", folder / "mvdream-tiny.yaml")
    return path
