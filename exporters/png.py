"""PNG encoding of an 8-bit RGB(A) image array (Pillow), for texture files and embedded GLB images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from exporters.atomic import atomic_write_bytes


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG file contents for `image`, an (H, W, 3) or (H, W, 4) uint8 array (row 0 is the top)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3|4) uint8 image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(image: np.ndarray, path: Path | str) -> Path:
    """Write `image` (see `png_bytes`) to `path`; returns `path`."""
    return atomic_write_bytes(path, png_bytes(image))
