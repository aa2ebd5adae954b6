"""Turntable videos (MP4, H.264) and image grids (PNG), written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from exporters.atomic import atomic_path

_MACRO_BLOCK = 16  # H.264 encodes 16x16 macroblocks; other sizes would be silently resized


def _as_uint8(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be an HxWx3 array, got shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"{what} must be uint8 or float in [0, 1], got {image.dtype}")
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image


MP4_WRITER_HINT = "pip install imageio-ffmpeg"


def require_mp4_writer() -> None:
    """Raise ImportError naming the package to install when no MP4 encoder is available.

    imageio encodes through the ffmpeg binary that imageio-ffmpeg ships; callers check this before
    spending minutes rendering the frames of a video that cannot be written.
    """
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ImportError(f"the MP4 writer imageio-ffmpeg is not installed ({MP4_WRITER_HINT})") from None
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        raise ImportError(f"imageio-ffmpeg finds no ffmpeg binary ({MP4_WRITER_HINT}, "
                          "or set IMAGEIO_FFMPEG_EXE)") from None


def write_video(frames: Sequence[np.ndarray], path: Path | str, fps: int, progress: bool | None = False) -> Path:
    """Encode HxWx3 uint8 frames as MP4 (libx264, yuv420p so every player opens it); returns `path`.

    Raises ValueError when there are no frames, they differ in size, or H or W is not a multiple of 16,
    and ImportError when the MP4 writer is missing (see `require_mp4_writer`). `progress` shows a tqdm
    bar over the frames (None: only on a terminal).
    """
    import imageio.v2 as imageio
    from tqdm import tqdm

    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    frames = [_as_uint8(f, f"video frame {i}") for i, f in enumerate(frames)]
    h, w = frames[0].shape[:2]
    if h % _MACRO_BLOCK or w % _MACRO_BLOCK:
        raise ValueError(f"video frames are {w}x{h}; width and height must be multiples of {_MACRO_BLOCK}")
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError("video frames differ in size")
    require_mp4_writer()
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=_MACRO_BLOCK, quality=8)
        try:
            for frame in tqdm(frames, desc=f"encoding {path.name}", unit="frame", dynamic_ncols=True,
                              disable=None if progress is None else not progress):
                writer.append_data(frame)
        finally:
            writer.close()
    return path


def image_grid(images: Sequence[np.ndarray], cols: int) -> np.ndarray:
    """Tile equally sized HxWx3 images row by row into one image; empty cells are black."""
    if len(images) == 0:
        raise ValueError("an image grid needs at least one image")
    if cols < 1:
        raise ValueError(f"an image grid needs at least one column, got {cols}")
    images = [_as_uint8(im, f"grid image {i}") for i, im in enumerate(images)]
    h, w = images[0].shape[:2]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError("grid images differ in size")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for n, im in enumerate(images):
        r, c = divmod(n, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return grid


def write_image_grid(images: Sequence[np.ndarray], path: Path | str, cols: int) -> Path:
    """Write `images` tiled `cols` per row as a PNG; returns `path`."""
    import imageio.v3 as iio

    grid = image_grid(images, cols)
    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, grid, extension=".png")
    return path
