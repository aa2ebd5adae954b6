"""Wavefront OBJ with texture coordinates, normals and an MTL whose diffuse map is a PNG beside it.

A physically based material (albedo, roughness, metallic) adds two grey PNGs, `<stem>_roughness.png` and
`<stem>_metallic.png`, named by the MTL's PBR extension (`Pr`/`map_Pr` roughness, `Pm`/`map_Pm` metallic):
the keys Blender's OBJ importer and exporter use for the Principled BSDF's roughness and metallic, and that
tinyobjloader and assimp read; viewers without them still show the albedo (`map_Kd`).

Texture coordinates follow OBJ's convention: (0, 0) is the image's bottom-left corner, so image row 0
(the top) is v = 1. Positions and normals may be shared across a UV seam while texture coordinates are
not, so faces index them separately (`f v/vt/vn`): the OBJ stays welded where the geometry is.
The three files are written texture first and OBJ last, so an OBJ on disk always finds its material.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.arrays import uv_mesh_arrays
from exporters.atomic import atomic_write_text
from exporters.png import write_png

_MATERIAL = "material0"


def _rows(fmt: str, array: np.ndarray) -> str:
    """One `fmt` line per row with a single %-format over the whole array (much faster than np.savetxt)."""
    values = array.astype(np.float64 if array.dtype.kind == "f" else np.int64).ravel().tolist()
    return ((fmt + "\n") * len(array)) % tuple(values)


def mtl_text(texture_name: str, material: str = _MATERIAL, roughness_name: str = "",
             metallic_name: str = "") -> str:
    """An albedo-only material: the diffuse colour is the texture (Kd 1 multiplies it), no specular
    highlight (Ks 0, illum 1: colour and ambient only), no ambient tint of its own (Ka 0), opaque. With
    roughness and metallic maps, a PBR material: Pr 1 / Pm 1 (the maps' values hold) and map_Pr / map_Pm."""
    text = (f"newmtl {material}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 1\nd 1\nillum 1\n"
            f"map_Kd {texture_name}\n")
    if roughness_name:
        text += f"Pr 1\nmap_Pr {roughness_name}\n"
    if metallic_name:
        text += f"Pm 1\nmap_Pm {metallic_name}\n"
    return text


def write_textured_obj(path: Path | str, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                       image: np.ndarray, normals: np.ndarray | None = None,
                       uv_faces: np.ndarray | None = None,
                       metallic_roughness: np.ndarray | None = None) -> list[Path]:
    """Write `path` (.obj), its .mtl and its .png texture (same stem); returns the paths, OBJ first. With
    `metallic_roughness` ((H, W, 3) uint8, roughness in G and metallic in B, as glTF packs them) also
    `<stem>_roughness.png` and `<stem>_metallic.png`, named in the MTL.

    vertices: (N, 3) float; faces: (M, 3) int, 0-based, counter-clockwise from outside; uvs: (T, 2) in
    [0, 1], OBJ convention (v up); uv_faces: (M, 3) indices into `uvs` (default: `faces`, one UV per
    vertex); normals: (N, 3) per vertex, indexed like `vertices`; image: (H, W, 3) uint8, row 0 on top.
    """
    path = Path(path)
    vertices, faces, uvs, uv_faces, normals = uv_mesh_arrays(vertices, faces, uvs, uv_faces, normals)
    uvs = uvs.astype(np.float32)  # written as float32, as before: the same digits

    mtl, png = path.with_suffix(".mtl"), path.with_suffix(".png")
    lines = [f"# threed textured mesh: {len(vertices)} vertices, {len(uvs)} texture coordinates, "
             f"{len(faces)} faces\nmtllib {mtl.name}\n", _rows("v %.6f %.6f %.6f", vertices),
             _rows("vt %.6f %.6f", uvs)]
    corners = np.stack([faces + 1, uv_faces + 1], axis=-1)  # (M, 3, 2): v, vt per corner
    if normals is not None:
        lines.append(_rows("vn %.5f %.5f %.5f", np.asarray(normals, dtype=np.float32).reshape(-1, 3)))
        corners = np.concatenate([corners, faces[..., None] + 1], axis=-1)
        face_fmt = "f %d/%d/%d %d/%d/%d %d/%d/%d"
    else:
        face_fmt = "f %d/%d %d/%d %d/%d"
    lines += [f"usemtl {_MATERIAL}\n", _rows(face_fmt, corners.reshape(len(faces), -1))]

    write_png(image, png)
    maps: list[Path] = []
    if metallic_roughness is not None:
        for name, channel in (("roughness", 1), ("metallic", 2)):
            maps.append(write_png(np.ascontiguousarray(np.repeat(metallic_roughness[..., channel:channel + 1], 3,
                                                                 axis=-1)), path.with_name(f"{path.stem}_{name}.png")))
    atomic_write_text(mtl, mtl_text(png.name, roughness_name=maps[0].name if maps else "",
                                    metallic_name=maps[1].name if maps else ""))
    atomic_write_text(path, "".join(lines))
    return [path, mtl, png, *maps]
