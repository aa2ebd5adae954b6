"""glTF 2.0 binary (.glb) with a baked albedo texture: one mesh, one node, one PBR material.

The material is metallic-roughness with the PNG as `baseColorTexture` (embedded through a buffer view,
mimeType image/png), metallic 0 and roughness 1: the texture holds albedo only, so the asset should look
matte and non-metallic under any renderer's lights. The sampler filters linearly with mipmaps and clamps
at the edges (an atlas does not tile). Layout as in exporters/glb.py: a space-padded JSON chunk, a
zero-padded BIN chunk, and every buffer view starting on a 4-byte boundary.

Texture coordinates come in OBJ's convention (v up, image row 0 is v = 1) like the OBJ writer's and are
stored flipped, as glTF puts (0, 0) at the image's top-left corner.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from exporters.atomic import atomic_write_bytes
from exporters.png import png_bytes

_MAGIC = 0x46546C67  # "glTF"
_JSON = 0x4E4F534A
_BIN = 0x004E4942
_FLOAT = 5126
_UINT32 = 5125
_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_TRIANGLES = 4
_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_CLAMP_TO_EDGE = 33071


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """Unit length in float32 (the validator rejects NORMAL vectors off unit length by > 5e-4); a zero
    vector becomes +y rather than NaN."""
    n = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(length > 1e-12, n / np.maximum(length, 1e-12), np.array([0.0, 1.0, 0.0]))
    return n.astype(np.float32)


def textured_glb_bytes(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, image: np.ndarray,
                       normals: np.ndarray | None = None) -> bytes:
    """The .glb file contents. One UV and one normal per vertex (glTF has no separate UV indices: split
    vertices along UV seams first). vertices: (N, 3); faces: (M, 3) 0-based, counter-clockwise from
    outside; uvs: (N, 2) in [0, 1], v up; normals: (N, 3) or None; image: (H, W, 3) uint8, row 0 on top."""
    positions = np.ascontiguousarray(vertices, dtype="<f4").reshape(-1, 3)
    n = len(positions)
    uvs = np.asarray(uvs, dtype=np.float64).reshape(-1, 2)
    indices = np.ascontiguousarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(uvs) != n or (normals is not None and len(normals) != n):
        raise ValueError("a textured GLB needs one UV (and one normal) per vertex")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise ValueError("faces index vertices that do not exist")
    texcoords = np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1).astype("<f4")
    attributes: list[tuple[str, np.ndarray, str]] = [("POSITION", positions, "VEC3")]
    if normals is not None:
        attributes.append(("NORMAL", unit_normals(normals).astype("<f4"), "VEC3"))
    attributes.append(("TEXCOORD_0", texcoords, "VEC2"))

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
        accessor = {"bufferView": add_view(array.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT,
                    "count": n, "type": kind}
        if name == "POSITION":  # bounds are required for positions
            accessor["min"] = [float(v) for v in array.min(axis=0)] if n else [0.0] * 3
            accessor["max"] = [float(v) for v in array.max(axis=0)] if n else [0.0] * 3
        accessors.append(accessor)
        primitive_attributes[name] = len(accessors) - 1
    accessors.append({"bufferView": add_view(indices.astype("<u4").tobytes(), _ELEMENT_ARRAY_BUFFER),
                      "componentType": _UINT32, "count": int(indices.size), "type": "SCALAR"})
    image_view = add_view(png_bytes(image), None)
    binary = _pad(bytes(blob), b"\x00")

    document = {
        "asset": {"version": "2.0", "generator": "threed"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "threed"}],
        "meshes": [{"name": "threed", "primitives": [{
            "attributes": primitive_attributes, "indices": len(accessors) - 1, "material": 0,
            "mode": _TRIANGLES}]}],
        "materials": [{"name": "albedo", "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0, "texCoord": 0}, "baseColorFactor": [1.0, 1.0, 1.0, 1.0],
            "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
        "textures": [{"sampler": 0, "source": 0}],
        "images": [{"bufferView": image_view, "mimeType": "image/png", "name": "albedo"}],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                      "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    text = _pad(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<III", _MAGIC, 2, total) + struct.pack("<II", len(text), _JSON) + text
            + struct.pack("<II", len(binary), _BIN) + binary)


def write_textured_glb(path: Path | str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                       image: np.ndarray, normals: np.ndarray | None = None) -> Path:
    """Write a textured binary glTF to `path` (see `textured_glb_bytes`); returns `path`."""
    return atomic_write_bytes(path, textured_glb_bytes(vertices, faces, uvs, image, normals))
