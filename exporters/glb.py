"""glTF 2.0 binary (.glb) writer: one mesh, one node, vertex colours under a white PBR material.

glTF defines COLOR_0 as linear, while threed's albedo (like OBJ and PLY vertex colours and every image) is
sRGB-encoded: colours are converted on the way in, or viewers would show the mesh too light.

Written with `struct` and `json` rather than a library so the layout is exactly what the spec asks
for: a JSON chunk padded with spaces and a BIN chunk padded with zeros, both to 4 bytes, and one
buffer view per attribute (each a multiple of 4 bytes, so every view starts aligned).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from exporters.arrays import mesh_arrays
from exporters.atomic import atomic_write_bytes

_MAGIC = 0x46546C67  # "glTF"
_JSON = 0x4E4F534A
_BIN = 0x004E4942
_FLOAT = 5126
_UINT32 = 5125
_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_TRIANGLES = 4


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """Unit length in float32 (the validator rejects NORMAL vectors off unit length by > 5e-4); a zero
    vector becomes +y rather than NaN."""
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 1e-12, n / np.maximum(length, 1e-12), np.array([0.0, 1.0, 0.0]))
    return n.astype(np.float32)


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function inverted (IEC 61966-2-1), for values in [0, 1]."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def pack_glb(attributes: list[tuple[str, np.ndarray, str]], indices: np.ndarray, material: dict,
             images: list[tuple[str, bytes]] = (), extra: dict | None = None) -> bytes:
    """A .glb of one mesh under one node with one material. Each vertex attribute (name, array, glTF type
    such as "VEC3"; stored as float32) and the triangle indices get a buffer view of the one buffer, then
    each image (name, PNG bytes) one of its own, listed under "images" in that order (what a texture's
    `source` counts); `extra` adds top-level entries such as textures and samplers."""
    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []
    primitive_attributes: dict[str, int] = {}

    def add_view(data: bytes, target: int | None) -> int:
        blob.extend(b"\x00" * (-len(blob) % 4))
        view = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:  # an image's view has no target
            view["target"] = target
        views.append(view)
        blob.extend(data)
        return len(views) - 1

    for name, array, kind in attributes:
        array = np.ascontiguousarray(array, dtype="<f4")
        accessor = {"bufferView": add_view(array.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT,
                    "count": len(array), "type": kind}
        if name == "POSITION":  # bounds are required for positions
            accessor["min"] = [float(v) for v in array.min(axis=0)] if len(array) else [0.0] * 3
            accessor["max"] = [float(v) for v in array.max(axis=0)] if len(array) else [0.0] * 3
        accessors.append(accessor)
        primitive_attributes[name] = len(accessors) - 1
    flat = np.ascontiguousarray(indices, dtype="<u4").reshape(-1)
    accessors.append({"bufferView": add_view(flat.tobytes(), _ELEMENT_ARRAY_BUFFER),
                      "componentType": _UINT32, "count": int(flat.size), "type": "SCALAR"})
    image_entries = [{"bufferView": add_view(data, None), "mimeType": "image/png", "name": name}
                     for name, data in images]
    binary = _pad(bytes(blob), b"\x00")

    document = {
        "asset": {"version": "2.0", "generator": "threed"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "threed"}],
        "meshes": [{"name": "threed", "primitives": [{
            "attributes": primitive_attributes, "indices": len(accessors) - 1, "material": 0,
            "mode": _TRIANGLES}]}],
        "materials": [material],
        **({"images": image_entries} if image_entries else {}),
        **(extra or {}),
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    text = _pad(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<III", _MAGIC, 2, total) + struct.pack("<II", len(text), _JSON) + text
            + struct.pack("<II", len(binary), _BIN) + binary)


def glb_bytes(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              normals: np.ndarray | None = None) -> bytes:
    """The .glb file contents for the mesh (arrays as for `write_glb`)."""
    mesh = mesh_arrays(vertices, faces, colors, normals)
    attributes: list[tuple[str, np.ndarray, str]] = [("POSITION", mesh.vertices, "VEC3")]
    if mesh.normals is not None:
        attributes.append(("NORMAL", unit_normals(mesh.normals), "VEC3"))
    if mesh.colors is not None:
        attributes.append(("COLOR_0", srgb_to_linear(mesh.colors), "VEC3"))
    material = {"name": "vertex_color", "pbrMetallicRoughness": {
        "baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0}}
    return pack_glb(attributes, mesh.faces, material)


def write_glb(path: Path | str, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
              normals: np.ndarray | None = None) -> Path:
    """Write the mesh as a binary glTF to `path`; returns `path`.

    vertices (N, 3), faces (M, 3) 0-based indices, optional colors (N, 3) in [0, 1] and normals (N, 3).
    """
    atomic_write_bytes(path, glb_bytes(vertices, faces, colors, normals))
    return Path(path)
