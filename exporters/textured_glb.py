"""glTF 2.0 binary (.glb) with a baked albedo texture: one mesh, one node, one PBR material.

The material is metallic-roughness with the PNG as `baseColorTexture` (embedded through a buffer view,
mimeType image/png). With an albedo texture alone its metallic is 0 and roughness 1, so the asset looks matte
and non-metallic under any renderer's lights; with a `metallic_roughness` image (a physically based material,
e.g. Fantasia3D's) that image is the `metallicRoughnessTexture`, read by glTF's convention: roughness in the
green channel, metallic in the blue (red unused, written 255), both factors 1 so the texture's values hold. The sampler filters linearly with mipmaps and clamps
at the edges (an atlas does not tile). Layout as in exporters/glb.py: a space-padded JSON chunk, a
zero-padded BIN chunk, and every buffer view starting on a 4-byte boundary.

Texture coordinates come in OBJ's convention (v up, image row 0 is v = 1) like the OBJ writer's and are
stored flipped, as glTF puts (0, 0) at the image's top-left corner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.arrays import uv_mesh_arrays
from exporters.atomic import atomic_write_bytes
from exporters.glb import pack_glb, unit_normals
from exporters.png import png_bytes

_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_CLAMP_TO_EDGE = 33071


def textured_glb_bytes(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, image: np.ndarray,
                       normals: np.ndarray | None = None, metallic_roughness: np.ndarray | None = None) -> bytes:
    """The .glb file contents. One UV and one normal per vertex (glTF has no separate UV indices: split
    vertices along UV seams first). vertices: (N, 3); faces: (M, 3) 0-based, counter-clockwise from
    outside; uvs: (N, 2) in [0, 1], v up; normals: (N, 3) or None; image: (H, W, 3) uint8, row 0 on top;
    metallic_roughness: None or (H', W', 3) uint8 laid out like `image`, roughness in G and metallic in B."""
    positions, indices, uvs, _, normals = uv_mesh_arrays(vertices, faces, uvs, normals=normals)
    if len(uvs) != len(positions):
        raise ValueError("a textured GLB needs one UV (and one normal) per vertex")
    texcoords = np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1)
    attributes: list[tuple[str, np.ndarray, str]] = [("POSITION", positions, "VEC3")]
    if normals is not None:
        attributes.append(("NORMAL", unit_normals(normals), "VEC3"))
    attributes.append(("TEXCOORD_0", texcoords, "VEC2"))
    pbr = {"baseColorTexture": {"index": 0, "texCoord": 0}, "baseColorFactor": [1.0, 1.0, 1.0, 1.0],
           "metallicFactor": 0.0, "roughnessFactor": 1.0}
    images = [("albedo", png_bytes(image))]
    textures = [{"sampler": 0, "source": 0}]
    if metallic_roughness is not None:
        pbr.update(metallicFactor=1.0, metallicRoughnessTexture={"index": 1, "texCoord": 0})
        images.append(("metallicRoughness", png_bytes(metallic_roughness)))
        textures.append({"sampler": 0, "source": 1})
    material = {"name": "pbr" if metallic_roughness is not None else "albedo", "pbrMetallicRoughness": pbr}
    extra = {"textures": textures,
             "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                           "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}]}
    return pack_glb(attributes, indices, material, images=images, extra=extra)


def write_textured_glb(path: Path | str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                       image: np.ndarray, normals: np.ndarray | None = None,
                       metallic_roughness: np.ndarray | None = None) -> Path:
    """Write a textured binary glTF to `path` (see `textured_glb_bytes`); returns `path`."""
    return atomic_write_bytes(path, textured_glb_bytes(vertices, faces, uvs, image, normals, metallic_roughness))
