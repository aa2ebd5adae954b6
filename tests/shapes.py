"""Reference meshes for tests: watertight, inside the unit cube, y up, a few thousand faces at most.

Vertex colours vary smoothly with position, so a recovered field's colours can be compared with the
reference point by point (a uniform colour would hide a mirrored or rotated result).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import trimesh

from threed.io import atomic_write_bytes


def position_colors(vertices: np.ndarray) -> np.ndarray:
    """RGB in [0.15, 0.85] from the position in the unit cube: red grows with x, green with y, blue with z."""
    return np.clip(0.5 + 0.35 * np.asarray(vertices, dtype=np.float64), 0.15, 0.85)


def _finish(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)
    mesh.fix_normals()  # consistent outward winding
    colors = (position_colors(mesh.vertices) * 255).round().astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.c_[colors, np.full(len(colors), 255, np.uint8)])
    return mesh


def _from_sdf(sdf: Callable[[np.ndarray], np.ndarray], extent: float, resolution: int, max_faces: int) -> trimesh.Trimesh:
    """Marching cubes of an SDF on [-extent, extent]^3, decimated to at most `max_faces` faces."""
    import mcubes

    axis = np.linspace(-extent, extent, resolution)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    values = sdf(grid.reshape(-1, 3)).reshape(resolution, resolution, resolution)
    vertices, faces = mcubes.marching_cubes(-values, 0.0)  # mcubes wants inside > level
    vertices = vertices * (2 * extent / (resolution - 1)) - extent
    mesh = trimesh.Trimesh(vertices, faces.astype(np.int64), process=True)
    if len(mesh.faces) > max_faces:
        import fast_simplification

        v, f = fast_simplification.simplify(mesh.vertices, mesh.faces, target_reduction=1.0 - max_faces / len(mesh.faces))
        mesh = trimesh.Trimesh(v, f, process=True)
    return mesh


def sphere(radius: float = 0.5, subdivisions: int = 3) -> trimesh.Trimesh:
    """Icosphere at the origin (1280 faces at 3 subdivisions)."""
    return _finish(trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius))


def ellipsoid(radii: tuple[float, float, float] = (0.55, 0.35, 0.4), subdivisions: int = 3) -> trimesh.Trimesh:
    """An icosphere scaled per axis: different extents along x, y and z catch swapped axes."""
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    return _finish(trimesh.Trimesh(mesh.vertices * np.asarray(radii), mesh.faces))


def rounded_box(half_extents: tuple[float, float, float] = (0.45, 0.3, 0.35), radius: float = 0.08,
                resolution: int = 48, max_faces: int = 3000) -> trimesh.Trimesh:
    """A box with rounded edges (flat faces and sharp-ish silhouettes)."""
    h = np.asarray(half_extents) - radius

    def sdf(p: np.ndarray) -> np.ndarray:
        q = np.abs(p) - h
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0) - radius

    return _finish(_from_sdf(sdf, 0.6, resolution, max_faces))


def torus(major_radius: float = 0.4, minor_radius: float = 0.15, major_sections: int = 48,
          minor_sections: int = 20) -> trimesh.Trimesh:
    """A torus lying in the xz-plane (axis y): the hole is seen from above, not from the side."""
    mesh = trimesh.creation.torus(major_radius=major_radius, minor_radius=minor_radius,
                                  major_sections=major_sections, minor_sections=minor_sections)
    to_y_up = trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])  # z axis -> y axis
    mesh.apply_transform(to_y_up)
    return _finish(mesh)


def cup(outer_radius: float = 0.42, height: float = 0.7, wall: float = 0.1, floor: float = 0.12,
        resolution: int = 48, max_faces: int = 3000) -> trimesh.Trimesh:
    """A thick-walled open cup standing on y = -height/2: a concavity visible from above the rim."""
    half = height / 2

    def sdf(p: np.ndarray) -> np.ndarray:
        r = np.linalg.norm(p[:, [0, 2]], axis=-1)
        outer = np.maximum(r - outer_radius, np.abs(p[:, 1]) - half)
        inner_half = (height - floor) / 2
        inner_y = p[:, 1] - (-half + floor + inner_half)
        inner = np.maximum(r - (outer_radius - wall), np.abs(inner_y) - inner_half - 0.05)  # open past the rim
        return np.maximum(outer, -inner)

    return _finish(_from_sdf(sdf, 0.55, resolution, max_faces))


def _ellipsoid_sdf(p: np.ndarray, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance to an ellipsoid (exact on the surface, a bound near it; Quilez's k0 (k0 - 1) / k1)."""
    q = (p - np.asarray(centre)) / np.asarray(radii)
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / np.asarray(radii), axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: min(a, b) where they differ by more than k, a blend (a fillet) within k."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def duck(resolution: int = 64, max_faces: int = 16000, blend: float = 0.12) -> trimesh.Trimesh:
    """A smooth duck-like solid: an ellipsoid body (long along z) and a sphere head above its front,
    joined by a fillet of width `blend` (a smooth SDF union). Every part is smooth, so a recovered surface
    can be no smoother than the reference: its normal consistency to it measures lumps and facets."""

    def sdf(p: np.ndarray) -> np.ndarray:
        body = _ellipsoid_sdf(p, (0.0, -0.12, -0.05), (0.32, 0.24, 0.46))
        head = np.linalg.norm(p - np.array([0.0, 0.2, 0.22]), axis=-1) - 0.19
        return _smooth_min(body, head, blend)

    return _finish(_from_sdf(sdf, 0.6, resolution, max_faces))


def peanut(resolution: int = 64, max_faces: int = 12000, blend: float = 0.1) -> trimesh.Trimesh:
    """Two spheres side by side along x joined by a fillet: a saddle-shaped concave waist between two convex
    lobes, a concavity that cameras above and below the equator see (unlike a cup's cavity)."""

    def sdf(p: np.ndarray) -> np.ndarray:
        left = np.linalg.norm(p - np.array([-0.24, 0.0, 0.0]), axis=-1) - 0.3
        right = np.linalg.norm(p - np.array([0.24, 0.02, 0.0]), axis=-1) - 0.27
        return _smooth_min(left, right, blend)

    return _finish(_from_sdf(sdf, 0.6, resolution, max_faces))


# `duck` and `peanut` are not in ALL (the shapes every raycast test sweeps): the smoothness benchmark's and
# Fantasia3D's oracle references.
ALL = {"sphere": sphere, "ellipsoid": ellipsoid, "rounded_box": rounded_box, "torus": torus, "cup": cup}


def save(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Write a binary PLY with vertex colours, atomically."""
    path = Path(path)
    atomic_write_bytes(path, trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=False))
    return path
