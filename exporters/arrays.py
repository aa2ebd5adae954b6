"""The plain arrays every mesh exporter takes, checked once: positions, triangles, optional colours and normals."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class MeshArrays(NamedTuple):
    vertices: np.ndarray  # (N, 3) float32
    faces: np.ndarray  # (M, 3) int64, counter-clockwise seen from outside
    colors: np.ndarray | None  # (N, 3) float32 in [0, 1]
    normals: np.ndarray | None  # (N, 3) float32


def mesh_arrays(vertices, faces, colors=None, normals=None) -> MeshArrays:
    """Contiguous float32 / int64 copies (views when already so) with shapes and indices checked.

    Raises ValueError for arrays that cannot be a triangle mesh: a file with dangling indices or
    mismatched attribute counts would load wrongly or not at all in other programs.
    """
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.ascontiguousarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be an (N, 3) array, got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must be an (M, 3) array of vertex indices, got shape {f.shape}")
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"faces index vertices that do not exist (indices {f.min()}..{f.max()}, {len(v)} vertices)")
    out = [v, f]
    for name, value in (("colors", colors), ("normals", normals)):
        if value is not None:
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape != v.shape:
                raise ValueError(f"{name} must be an (N, 3) array matching the {len(v)} vertices, "
                                 f"got shape {value.shape}")
            if name == "colors":
                value = np.clip(value, 0.0, 1.0)
        out.append(value)
    return MeshArrays(*out)


class UVMeshArrays(NamedTuple):
    vertices: np.ndarray  # (N, 3) float32
    faces: np.ndarray  # (M, 3) int64
    uvs: np.ndarray  # (T, 2) float64, v up
    uv_faces: np.ndarray  # (M, 3) int64 indices into uvs, one per face corner
    normals: np.ndarray | None  # (N, 3) float32


def uv_mesh_arrays(vertices, faces, uvs, uv_faces=None, normals=None) -> UVMeshArrays:
    """`mesh_arrays`' checks plus texture coordinates: `uv_faces` (M, 3) index `uvs` (T, 2) per face corner
    (None: one UV per vertex, indexed by `faces`). Raises ValueError as `mesh_arrays` does."""
    mesh = mesh_arrays(vertices, faces, normals=normals)
    uv = np.ascontiguousarray(uvs, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ValueError(f"uvs must be a (T, 2) array, got shape {uv.shape}")
    uvf = mesh.faces if uv_faces is None else np.ascontiguousarray(uv_faces, dtype=np.int64)
    if uvf.shape != mesh.faces.shape:
        raise ValueError(f"{len(mesh.faces)} faces but UV faces of shape {uvf.shape}")
    if len(uvf) and (uvf.min() < 0 or uvf.max() >= len(uv)):
        raise ValueError(f"UV faces index texture coordinates that do not exist ({len(uv)} of them)")
    return UVMeshArrays(mesh.vertices, mesh.faces, uv, uvf, mesh.normals)
