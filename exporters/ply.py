"""Binary little-endian PLY: positions, normals and 8-bit vertex colours, triangle faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.arrays import mesh_arrays
from exporters.atomic import atomic_write_bytes


def write_ply(path: Path | str, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              normals: np.ndarray | None = None) -> Path:
    """Write the mesh to `path`; normals and colours are included when given. Returns `path`.

    vertices (N, 3), faces (M, 3) 0-based indices, optional colors (N, 3) in [0, 1] and normals (N, 3).
    """
    mesh = mesh_arrays(vertices, faces, colors, normals)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if mesh.normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if mesh.colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex = np.empty(len(mesh.vertices), dtype=fields)
    vertex["x"], vertex["y"], vertex["z"] = mesh.vertices.T
    if mesh.normals is not None:
        vertex["nx"], vertex["ny"], vertex["nz"] = mesh.normals.T
    if mesh.colors is not None:
        rgb = np.round(np.clip(mesh.colors, 0.0, 1.0) * 255.0).astype(np.uint8)
        vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    face = np.empty(len(mesh.faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"] = 3
    face["v"] = mesh.faces
    types = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment threed mesh",
              f"element vertex {len(vertex)}"]
    header += [f"property {types[t]} {name}" for name, t in fields]
    header += [f"element face {len(face)}", "property list uchar int vertex_indices", "end_header"]
    data = ("\n".join(header) + "\n").encode("ascii") + vertex.tobytes() + face.tobytes()
    atomic_write_bytes(path, data)
    return Path(path)
