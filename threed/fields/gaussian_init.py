"""The Gaussians' start from a user's mesh or point cloud (`threed run --method dreamgaussian --init-mesh PATH`)
instead of DreamGaussian's ball.

A mesh (OBJ/PLY/GLB/STL with triangles) gives `n` points drawn uniformly on its surface (area-weighted), each
coloured as the file colours that spot: its texture read at the interpolated UV (times a glTF material's base
colour factor), its vertex colours interpolated, or its face's colour. A point cloud (a PLY of vertices
without faces) gives its points (a random `n` of them where it has more) with their colours where it has
them. A file without colours starts at DreamGaussian's grey of 0.5. The points are fitted to the scene as
Fantasia3D's guide mesh is (threed/fields/sdf_init.py, `fit_guide_mesh`): centred on the file's bounding box,
its up and front axes turned to +y and +z, and scaled so its largest |coordinate| is the ball's radius
(gaussians.init_radius), where DreamGaussian's ball would have been. The Gaussians themselves start as the
ball's do (threed/fields/gaussians.py, `Gaussians.from_points`): isotropic at the nearest-neighbour scale,
identity rotation, gaussians.init_opacity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from threed.errors import UserError
from threed.fields.sdf_init import fit_guide_mesh
from threed.io import load_mesh_file

HINT = "pass --init-mesh PATH to a mesh (OBJ/PLY/GLB/STL) or a .ply point cloud, or drop it to start from a ball"


def _load(path: str | Path):
    """The file as a trimesh.Trimesh or trimesh.PointCloud (a scene's meshes joined); one-line errors."""
    return load_mesh_file(path, "init mesh", HINT, points=True)


def _surface_colors(mesh, faces: np.ndarray, bary: np.ndarray) -> np.ndarray | None:
    """(n, 3) colours in [0, 1] at the points `bary` (n, 3) of `faces` (n,): the texture at the interpolated
    UV, the interpolated vertex colours or the face colours, whichever the mesh has; None without colours."""
    visual = getattr(mesh, "visual", None)
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        uv = getattr(visual, "uv", None)
        material = getattr(visual, "material", None)
        if uv is None or material is None:
            return None
        uv = np.einsum("nk,nkd->nd", bary, np.asarray(uv, dtype=np.float64)[mesh.faces[faces]])
        rgba = material.to_color(uv)
        if rgba is None:
            return None
        rgba = np.broadcast_to(np.asarray(rgba, dtype=np.float64), (len(faces), 4)) / 255.0
        factor = getattr(material, "baseColorFactor", None)
        if factor is not None and getattr(material, "baseColorTexture", None) is not None:
            rgba = rgba * np.asarray(factor, dtype=np.float64) / 255.0  # glTF: texture times factor
        return rgba[:, :3]
    if kind == "face":
        return np.asarray(visual.face_colors, dtype=np.float64)[faces, :3] / 255.0
    vc = _vertex_colors(mesh)
    return np.einsum("nk,nkd->nd", bary, vc[mesh.faces[faces]]) if vc is not None else None


def _vertex_colors(mesh) -> np.ndarray | None:
    """(V, 3) vertex colours in [0, 1] of a mesh that has them (not a texture's), else None."""
    visual = getattr(mesh, "visual", None)
    if visual is None or getattr(visual, "kind", None) != "vertex":
        return None
    return np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0


def check_init_points(path: str | Path) -> None:
    """Raise the one-line error `load_init_points` would, without sampling (for the CLI, before any model)."""
    _load(path)


def load_init_points(path: str | Path, n: int, radius: float, up: str = "+y", front: str = "+z",
                     seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """(points (M, 3), colours (M, 3) in [0, 1] or None) to start the Gaussians from, in the scene's frame (see
    the module docstring): `n` on a mesh's surface, or a point cloud's (at most `n`)."""
    import trimesh

    loaded = _load(path)
    rng = np.random.default_rng(seed)
    vertices = np.asarray(loaded.vertices, dtype=np.float64)
    if isinstance(loaded, trimesh.Trimesh):
        areas = loaded.area_faces
        if not np.isfinite(areas).all() or areas.sum() <= 0:
            raise UserError(f"init mesh '{path}' has no surface area: {HINT}")
        faces = rng.choice(len(areas), size=n, p=areas / areas.sum())
        u, v = rng.random(n), rng.random(n)
        flip = u + v > 1
        u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
        bary = np.stack([1 - u - v, u, v], axis=1)  # uniform in each triangle
        points = np.einsum("nk,nkd->nd", bary, vertices[loaded.faces[faces]])
        colors = _surface_colors(loaded, faces, bary)
    else:
        keep = rng.choice(len(vertices), size=n, replace=False) if len(vertices) > n else np.arange(len(vertices))
        points = vertices[keep]
        raw = getattr(loaded, "colors", None)
        colors = (np.asarray(raw, dtype=np.float64)[keep, :3] / 255.0
                  if raw is not None and len(raw) == len(vertices) else None)
    # fitted with the file's own vertices, so that its box (not the sample's) is centred and scaled
    fitted = fit_guide_mesh(np.concatenate([vertices, points]), up, front, radius, 1.0)[len(vertices):]
    return (torch.tensor(fitted, dtype=torch.float32),
            torch.tensor(colors, dtype=torch.float32).clamp(0, 1) if colors is not None else None)
