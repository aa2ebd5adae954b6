"""Mesh exporters (OBJ, GLB, PLY) and video / image-grid writers.

Plain arrays in, files out: nothing here knows about runs or imports from `threed`, so the exporters can
be used (and tested) on their own. Every file is written atomically (`exporters.atomic`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from exporters.glb import write_glb
from exporters.obj import write_obj
from exporters.ply import write_ply
from exporters.video import write_image_grid, write_video

# Each takes (path, vertices, faces, colors=None, normals=None) and returns `path`.
EXPORTERS: dict[str, Callable[..., Path]] = {"obj": write_obj, "glb": write_glb, "ply": write_ply}


class UnknownFormatError(ValueError):
    """An export format no exporter writes; the message lists the ones that exist."""


def check_formats(formats: Iterable[str]) -> list[str]:
    """Normalised, de-duplicated format names (`.GLB` -> `glb`), or UnknownFormatError."""
    formats = list(dict.fromkeys(f.strip().lower().lstrip(".") for f in formats))
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise UnknownFormatError(f"unknown export format {', '.join(unknown)}: choose from {', '.join(EXPORTERS)}")
    return formats


def export_mesh(out_dir: Path | str, formats: Iterable[str], vertices: np.ndarray, faces: np.ndarray,
                colors: np.ndarray | None = None, normals: np.ndarray | None = None, stem: str = "mesh") -> list[Path]:
    """Write `<stem>.<fmt>` into `out_dir` for each format; returns every file written, in order (an OBJ's
    .mtl right after it). Formats are checked before anything is written."""
    formats = check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fmt in formats:
        path = EXPORTERS[fmt](out_dir / f"{stem}.{fmt}", vertices, faces, colors, normals)
        written.append(path)
        if fmt == "obj":
            written.append(path.with_suffix(".mtl"))
    return written


__all__ = ["EXPORTERS", "UnknownFormatError", "check_formats", "export_mesh", "write_glb", "write_image_grid",
           "write_obj", "write_ply", "write_video"]
