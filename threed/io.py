"""Files on disk: atomic writes (a crash or Ctrl-C never leaves a half-written file behind) and the folder
where threed keeps what it can reuse between runs.

The one atomic-write implementation lives in `exporters.atomic` (exporters import nothing from threed, so
the shared helper sits on their side); results follow the umask like a plain open().
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exporters.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from threed.errors import UserError, first_line

def cache_root() -> Path:
    """`$THREED_CACHE`, default `~/.cache/threed`: prompt embeddings, compiled kernels."""
    root = os.environ.get("THREED_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "threed"


__all__ = ["append_jsonl", "atomic_path", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "cache_root"]


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: Path | str, record: dict) -> None:
    """One JSON object per line; a line is written whole with a single write call. After a line cut short
    by a crash, the record starts a line of its own (it would otherwise be lost with the broken one)."""
    with open(path, "a+b") as f:
        cut = f.tell() > 0 and f.seek(-1, 2) >= 0 and f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())
        f.flush()


def load_mesh_file(path: str | Path, what: str, hint: str, points: bool = False) -> Any:
    """The user's mesh file at `path` as one trimesh.Trimesh (a scene's meshes joined); with `points`, a file of
    vertices without faces as a trimesh.PointCloud. A missing, empty or unreadable file, or one without
    triangles (without points), is one UserError line naming `what` (e.g. "guide mesh") and ending in `hint`."""
    import trimesh

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} '{path}' not found: {hint}")
    if p.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty (0 bytes): {hint}")
    try:
        loaded = trimesh.load(str(p))
        if isinstance(loaded, trimesh.Scene):
            parts = [g for g in loaded.dump() if isinstance(g, (trimesh.Trimesh, trimesh.PointCloud))]
            meshes = [g for g in parts if isinstance(g, trimesh.Trimesh) and len(g.faces)]
            loaded = trimesh.util.concatenate(meshes) if meshes else (parts[0] if parts else None)
    except Exception as e:  # trimesh raises many types for unreadable files
        raise UserError(f"cannot load {what} '{path}' ({first_line(e)}): {hint}") from None
    if isinstance(loaded, trimesh.Trimesh) and len(loaded.faces):
        return loaded
    if points and loaded is not None and len(getattr(loaded, "vertices", ())):
        if isinstance(loaded, trimesh.Trimesh):  # a PLY of vertices only loads as a Trimesh without faces
            visual = getattr(loaded, "visual", None)
            colors = visual.vertex_colors if getattr(visual, "kind", None) == "vertex" else None
            loaded = trimesh.PointCloud(loaded.vertices, colors=colors)
        return loaded
    raise UserError(f"{what} '{path}' {'holds no points' if points else 'has no triangles'}: {hint}")
