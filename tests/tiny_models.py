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
