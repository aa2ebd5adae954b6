"""The start of a geometry stage that follows no NeRF (Fantasia3D): a sphere, or a user's guide mesh, as SDF
values on the tetrahedral grid. One initialiser for both: `initial_sdf`.

A sphere's signed distance is exact (|p| - r). A guide mesh is first fitted to the scene: centred on its
bounding box, turned so that its up and front axes (as the user names them) become the scene's +y and +z
(threed's frame, the glTF convention), and scaled so its largest |coordinate| is `mesh_scale` of the scene's
bound (threestudio: 0.9 of its radius 1). Its inside is found by voxelising the surface at the grid's cell
size and filling the enclosed voxels (trimesh), then turned into distances on the grid the way a NeRF's
density is (threed/fields/dmtet.py, `sdf_from_values`), so an SDF learning rate means the same distance per
step from either start. threestudio instead fits an implicit SDF network to the mesh's signed distance
(pysdf) by 1000 Adam steps; threed needs no fitting: a per-vertex DMTet takes these values as they are, and
Fantasia3D's network SDF keeps them as its fixed start term (threed/fields/neural_sdf.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from threed.mesh_config import SDFInitConfig
from threed.errors import UserError
from threed.fields.dmtet import sdf_from_values
from threed.fields.tetgrid import TetGrid
from threed.io import load_mesh_file

AXES = {"+x": (1.0, 0.0, 0.0), "+y": (0.0, 1.0, 0.0), "+z": (0.0, 0.0, 1.0),
        "-x": (-1.0, 0.0, 0.0), "-y": (0.0, -1.0, 0.0), "-z": (0.0, 0.0, -1.0)}
_HINT = "pass --init-mesh PATH to a mesh file (OBJ/PLY/GLB/STL), or drop it to start from a sphere"


def load_guide_mesh(path: str | Path):
    """The guide mesh at `path` as one trimesh.Trimesh (a scene's parts joined); a missing, empty or
    unreadable file is one UserError line."""
    return load_mesh_file(path, "guide mesh", _HINT)


def fit_guide_mesh(vertices: np.ndarray, up: str, front: str, scale: float, bound: float) -> np.ndarray:
    """Vertices (N, 3) in the scene's frame: centred on their box, `up` turned to +y and `front` to +z,
    scaled so the largest |coordinate| is `scale` * `bound`."""
    if up[1] == front[1]:
        raise UserError(f"the guide mesh's up ({up}) and front ({front}) must be different axes: pass e.g. "
                        "--init-mesh-up +y --init-mesh-front +z")
    u, f = np.asarray(AXES[up]), np.asarray(AXES[front])
    rotation = np.stack([np.cross(u, f), u, f])  # rows: the mesh's right, up, front -> scene x, y, z
    v = np.asarray(vertices, dtype=np.float64)
    v = (v - (v.min(axis=0) + v.max(axis=0)) / 2) @ rotation.T
    extent = float(np.abs(v).max())
    if not np.isfinite(extent) or extent <= 0:
        raise UserError(f"the guide mesh has no extent (all vertices at one point): {_HINT}")
    return v * (scale * bound / extent)


def _inside(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, pitch: float) -> np.ndarray:
    """Which `points` lie inside the surface: voxelised at `pitch`, enclosed voxels filled."""
    import trimesh

    voxels = trimesh.Trimesh(vertices, faces, process=False).voxelized(pitch).fill()
    return np.asarray(voxels.is_filled(points), dtype=bool)


def initial_sdf(init: SDFInitConfig, grid: TetGrid, bound: float, device: torch.device | str = "cpu") -> Tensor:
    """SDF values (V,) on `grid`'s vertices, negative inside: the guide mesh `init.mesh` if one is named, else
    the sphere of radius `init.radius`."""
    points = grid.vertices(device)
    if not init.mesh:
        return points.norm(dim=-1) - float(init.radius)
    mesh = load_guide_mesh(init.mesh)
    vertices = fit_guide_mesh(mesh.vertices, init.mesh_up, init.mesh_front, init.mesh_scale, bound)
    inside = _inside(vertices, np.asarray(mesh.faces), points.cpu().double().numpy(), grid.cell_size)
    if not inside.any():
        raise UserError(f"guide mesh '{init.mesh}' encloses no grid vertex (is it an open surface or thinner than "
                        f"a cell?): {_HINT}")
    values = torch.from_numpy(inside.astype(np.float32)).to(device)
    return sdf_from_values(grid, values, 0.5, fill_cavities=True, keep_components=0.0)
