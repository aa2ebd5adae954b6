"""Mesh exporters (OBJ, GLB, PLY) and video / image-grid writers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from exporters.glb import write_glb
from exporters.obj import write_obj
from exporters.ply import write_ply
from exporters.video import write_image_grid, write_video
from threed.errors import UserError
from threed.mesh import Mesh

EXPORTERS: dict[str, Callable[[Mesh, Path], Path]] = {"obj": write_obj, "glb": write_glb, "ply": write_ply}


def export_mesh(mesh: Mesh, out_dir: Path | str, formats: Iterable[str], name: str = "mesh") -> list[Path]:
    """Write `<name>.<fmt>` into `out_dir` for each format; returns the paths written (OBJ's .mtl not listed)."""
    formats = list(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise UserError(f"unknown export format {', '.join(unknown)}: choose from {', '.join(EXPORTERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [EXPORTERS[f](mesh, out_dir / f"{name}.{f}") for f in formats]


__all__ = ["EXPORTERS", "export_mesh", "write_glb", "write_image_grid", "write_obj", "write_ply", "write_video"]
