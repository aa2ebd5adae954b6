"""Textured export: UV coverage, baking, gutter filling, textured OBJ/MTL/PNG and GLB round trips."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
import trimesh.exchange.obj

from exporters.atomic import atomic_write_bytes
from exporters.textured_glb import write_textured_glb
from exporters.textured_obj import write_textured_obj
from helpers_gltf import validate_gltf
from threed.errors import UserError
from threed.mesh import vertex_normals
from threed.texture import bake_texture, dilate, export_textured, push_pull_fill, unwrap, uv_coverage

RADIUS = 0.5


def position_colour(points: torch.Tensor) -> torch.Tensor:
    """Colour = position mapped from [-RADIUS, RADIUS]^3 to [0, 1]^3: a different colour at every point."""
    return (points / RADIUS + 1.0) / 2.0


def bumpy_sphere(subdivisions: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """An icosphere with a radial bump pattern (not a perfect sphere: charts have to bend)."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    v = np.asarray(sphere.vertices, dtype=np.float64)
    r = RADIUS * (0.9 + 0.08 * np.sin(5 * v[:, 0]) * np.sin(4 * v[:, 1]) * np.cos(3 * v[:, 2]))
    return (v * r[:, None]).astype(np.float32), np.asarray(sphere.faces, dtype=np.int64)


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an (H, W, 3) uint8 image at (K, 2) OBJ-convention UVs (v up, row 0 on top),
    texel centres at half-integers, as a GPU samples with linear filtering and clamping."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64) / 255.0
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def brute_force_cover(triangle: np.ndarray, width: int, height: int) -> tuple[set[int], float]:
    """Texel indices whose centres are strictly inside `triangle` (3, 2), tested at every texel of the image
    with the signs of the three cross products, and the smallest distance of any centre from an edge line."""
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    p = np.stack([cols.ravel(), rows.ravel()], axis=1)
    signs, distances = [], []
    for i in range(3):
        s, e = triangle[i], triangle[(i + 1) % 3]
        cross = (e[0] - s[0]) * (p[:, 1] - s[1]) - (e[1] - s[1]) * (p[:, 0] - s[0])
        signs.append(np.sign(cross))
        distances.append(np.abs(cross) / np.linalg.norm(e - s))
    signs = np.stack(signs)
    inside = np.all(signs > 0, axis=0) | np.all(signs < 0, axis=0)
    return set(np.flatnonzero(inside).tolist()), float(np.min(distances))


# ---------------------------------------------------------------- coverage

def test_uv_coverage_matches_point_in_triangle():
    """Random triangles (both windings, some partly outside the image): one call covers exactly the
    texels whose centres lie inside each, and barycentrics reproduce the centres."""
    rng = np.random.default_rng(0)
    width, height = 40, 28
    triangles = rng.uniform([-6, -6], [width + 6, height + 6], size=(60, 3, 2))
    triangles[::7] = rng.uniform([3, 3], [9, 9], size=(len(triangles[::7]), 3, 2))  # small ones too
    for k, tri in enumerate(triangles):
        texel, face, bary = uv_coverage(torch.from_numpy(tri[None]), width, height)
        expected, margin = brute_force_cover(tri, width, height)
        assert margin > 1e-5  # no centre on an edge: inside/outside is unambiguous
        assert set(texel.tolist()) == expected, k
        assert len(texel) == len(expected) and bool((face == 0).all())
        centres = torch.stack([texel % width + 0.5, texel // width + 0.5], dim=1).double()
        torch.testing.assert_close((bary[:, :, None] * torch.from_numpy(tri)[None]).sum(1), centres,
                                   atol=1e-9, rtol=0)
        assert bool((bary >= 0).all()) and torch.allclose(bary.sum(1), torch.ones(len(bary), dtype=torch.float64))
    # All at once (chunked by a small candidate budget): each texel goes to the last triangle covering it.
    texel, face, _ = uv_coverage(torch.from_numpy(triangles), width, height, max_candidates=500)
    owner = {}
    for k, tri in enumerate(triangles):
        for t in brute_force_cover(tri, width, height)[0]:
            owner[t] = k
    assert dict(zip(texel.tolist(), face.tolist())) == owner and len(texel) == len(owner)


def test_uv_coverage_edges_are_closed_and_shared_edges_covered_once():
    """Centres exactly on edges: a right triangle with legs on texel borders, (0,0)-(n,0)-(0,n), covers the
    centres (i+.5, j+.5) with i + j <= n - 1, n(n+1)/2 of them (the hypotenuse's n centres included); a
    square cut along its diagonal, or into a fan of 8, covers each of its texels exactly once."""
    n = 9
    texel, _, _ = uv_coverage(torch.tensor([[[0.0, 0.0], [n, 0.0], [0.0, n]]]), 16, 16)
    cols, rows = texel % 16, texel // 16
    assert len(texel) == n * (n + 1) // 2 and bool(((cols + rows) <= n - 1).all())

    lo, hi, mid = 2.0, 30.0, 16.0
    square = {r * 32 + c for r in range(2, 30) for c in range(2, 30)}
    halves = [[[lo, lo], [hi, lo], [hi, hi]], [[lo, lo], [hi, hi], [lo, hi]]]
    ring = [[lo, lo], [mid, lo], [hi, lo], [hi, mid], [hi, hi], [mid, hi], [lo, hi], [lo, mid]]
    fan = [[[mid, mid], ring[i], ring[(i + 1) % 8]] for i in range(8)]
    for triangles in (halves, fan):
        texel, _, _ = uv_coverage(torch.tensor(triangles), 32, 32)
        assert sorted(texel.tolist()) == sorted(square)  # no hole, no texel twice


# ---------------------------------------------------------------- gutter filling

def test_dilation_fills_texels_next_to_charts_with_their_colours():
    """Two charts 10 texels apart: after 4 rings, texels within 4 (Chebyshev) of a chart carry its colour
    exactly, the rest of the gap is still empty; push-pull then fills every texel, leaves chart texels
    unchanged, and no mip level (2x2 box averages) of a one-colour chart's texture sees the background."""
    size = 32
    image = torch.zeros(size, size, 3)
    mask = torch.zeros(size, size, dtype=torch.bool)
    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.8])
    mask[8:24, 4:11], image[8:24, 4:11] = True, red
    mask[8:24, 21:28], image[8:24, 21:28] = True, blue
    grown, grown_mask = dilate(image, mask, 4)
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[4:28, 0:15] = True
    expected[4:28, 17:32] = True
    assert torch.equal(grown_mask, expected)
    torch.testing.assert_close(grown[4:28, 0:15], red.expand(24, 15, 3))
    torch.testing.assert_close(grown[4:28, 17:32], blue.expand(24, 15, 3))

    filled = push_pull_fill(grown, grown_mask)
    assert torch.equal(filled[grown_mask], grown[grown_mask])
    assert bool((filled[~grown_mask].sum(-1) > 0.5).all())  # nothing left black

    left = mask & (torch.arange(size) < 16)  # the red chart alone
    one = push_pull_fill(*dilate(torch.where(left[..., None], red, torch.zeros(3)), left, 2))
    level = one.permute(2, 0, 1)[None]
    while level.shape[-1] > 1:
        level = torch.nn.functional.avg_pool2d(level, 2)
        torch.testing.assert_close(level[0].permute(1, 2, 0), red.expand(level.shape[-2], level.shape[-1], 3))


# ---------------------------------------------------------------- baking

@pytest.fixture(scope="module")
def baked_sphere():
    """Bumpy icosphere (1280 faces) unwrapped and baked with the position colour at 256^2."""
    v, f = bumpy_sphere(3)
    vmapping, uv_faces, uvs = unwrap(v, f, resolution=256)
    image = bake_texture(v, vmapping[uv_faces], uvs, uv_faces, position_colour, size=256, progress=False)
    return v, f, vmapping, uv_faces, uvs, image


def test_bake_reproduces_a_position_colour(baked_sphere):
    """Sampling the texture back reproduces the colour function. Inside a triangle the function is linear
    and the texels are exact up to 8-bit rounding: at face centroids the measured max error is 0.0019
    (allowed 1/255 + 0.001). Vertices lie on chart borders, where half the bilinear footprint is gutter:
    measured max 0.020, mean 0.0027 (allowed 0.04 and 0.008); with push-pull alone and no gutter rings
    the max was 0.50 (the neighbouring chart's colours bleed in). Measured on this 2-core CPU, 256^2."""
    v, f, vmapping, uv_faces, uvs, image = baked_sphere
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    corners = v[vmapping[uv_faces]]  # (M, 3, 3)
    truth = position_colour(torch.from_numpy(corners.mean(1))).numpy()
    centroid = sample_bilinear(image, uvs[uv_faces].mean(1))
    assert np.abs(centroid - truth).max() < 1.0 / 255 + 1e-3
    at_vertex = sample_bilinear(image, uvs)
    error = np.abs(at_vertex - position_colour(torch.from_numpy(v[vmapping])).numpy())
    assert error.max() < 0.04 and error.mean() < 0.008


def test_bake_inset_reads_below_the_surface():
    """With inset d the function is read d inside along the normal: on a sphere of radius R, at p (R - d) / R."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    v, f = sphere.vertices, sphere.faces
    vmapping, uv_faces, uvs = unwrap(v, f, resolution=128)
    image = bake_texture(v, vmapping[uv_faces], uvs, uv_faces, position_colour, size=128, progress=False,
                         inset=0.2)
    centroids = v[vmapping[uv_faces]].mean(1)
    inner = centroids / np.linalg.norm(centroids, axis=1, keepdims=True) * (RADIUS - 0.2)
    # Measured max 0.0041 (the interpolated normal of a 1280-face sphere is slightly off radial; without
    # the inset the error against the inner colours is 0.20); 0.01 allowed.
    error = np.abs(sample_bilinear(image, uvs[uv_faces].mean(1)) - position_colour(torch.from_numpy(inner)).numpy())
    assert error.max() < 0.01


# ---------------------------------------------------------------- writers

def raw_obj(path: Path) -> dict:
    with open(path) as file:
        (geometry,) = trimesh.exchange.obj.load_obj(file)["geometry"].values()
    return geometry


def test_textured_obj_round_trip(baked_sphere, tmp_path):
    """OBJ + MTL + PNG load in trimesh as a textured mesh: each face corner keeps its position (6
    decimals) and UV (6 decimals), the texture's pixels are exact, normals kept (5 decimals)."""
    v, f, vmapping, uv_faces, uvs, image = baked_sphere
    normals = vertex_normals(v, f)
    paths = write_textured_obj(tmp_path / "mesh.obj", v, vmapping[uv_faces], uvs, image, normals, uv_faces)
    assert [p.name for p in paths] == ["mesh.obj", "mesh.mtl", "mesh.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.mtl", "mesh.obj", "mesh.png"]  # no temp files
    mtl = (tmp_path / "mesh.mtl").read_text()
    assert "map_Kd mesh.png" in mtl and "Kd 1 1 1" in mtl and "Ks 0 0 0" in mtl

    loaded = trimesh.load(tmp_path / "mesh.obj", process=False)  # splits vertices at UV seams
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    np.testing.assert_array_equal(np.asarray(loaded.visual.material.image.convert("RGB")), image)
    assert len(loaded.faces) == len(f)
    np.testing.assert_allclose(loaded.vertices[loaded.faces], v[vmapping[uv_faces]], atol=1e-6)
    np.testing.assert_allclose(loaded.visual.uv[loaded.faces], uvs[uv_faces], atol=1e-6)
    geometry = raw_obj(tmp_path / "mesh.obj")
    np.testing.assert_allclose(np.linalg.norm(geometry["vertex_normals"], axis=1), 1.0, atol=2e-5)


def test_textured_glb_round_trip_and_validator(baked_sphere, tmp_path):
    """The GLB keeps positions, UVs (stored with v flipped, read back in trimesh's v-up form), unit normals,
    the PNG and a matte metallic-roughness material; the Khronos validator reports no error or warning."""
    v, f, vmapping, uv_faces, uvs, image = baked_sphere
    normals = vertex_normals(v, f)[vmapping]
    path = write_textured_glb(tmp_path / "mesh.glb", v[vmapping], uv_faces, uvs, image, normals)

    scene = trimesh.load(path, process=False, maintain_order=True)
    (loaded,) = scene.geometry.values()
    np.testing.assert_array_equal(loaded.vertices, v[vmapping])
    np.testing.assert_array_equal(loaded.faces, uv_faces)
    np.testing.assert_allclose(loaded.visual.uv, uvs, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(loaded.visual.material.baseColorTexture.convert("RGB")), image)

    gltf = pygltflib.GLTF2().load(str(path))
    prim = gltf.meshes[0].primitives[0]
    blob = gltf.binary_blob()

    def read(accessor_index: int, width: int) -> np.ndarray:
        accessor = gltf.accessors[accessor_index]
        offset = gltf.bufferViews[accessor.bufferView].byteOffset
        return np.frombuffer(blob, "<f4", count=accessor.count * width, offset=offset).reshape(-1, width)

    np.testing.assert_allclose(read(prim.attributes.TEXCOORD_0, 2), np.c_[uvs[:, 0], 1 - uvs[:, 1]], atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(read(prim.attributes.NORMAL, 3), axis=1), 1.0, atol=1e-6)
    position = gltf.accessors[prim.attributes.POSITION]
    np.testing.assert_allclose(position.min, v[vmapping].min(0), rtol=1e-7)
    np.testing.assert_allclose(position.max, v[vmapping].max(0), rtol=1e-7)
    pbr = gltf.materials[prim.material].pbrMetallicRoughness
    assert (pbr.metallicFactor, pbr.roughnessFactor) == (0.0, 1.0)
    texture = gltf.textures[pbr.baseColorTexture.index]
    assert gltf.images[texture.source].mimeType == "image/png"
    assert gltf.images[texture.source].bufferView is not None and gltf.images[texture.source].uri is None
    sampler = gltf.samplers[texture.sampler]
    assert (sampler.wrapS, sampler.wrapT) == (pygltflib.CLAMP_TO_EDGE, pygltflib.CLAMP_TO_EDGE)
    assert sampler.magFilter == pygltflib.LINEAR

    report = validate_gltf(path)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    assert report["info"]["totalTriangleCount"] == len(f)


# ---------------------------------------------------------------- end to end

def test_export_textured_decimates_and_writes_both_formats(tmp_path):
    """A 5120-face bumpy sphere exported with max_faces=2000: both files load with at most 2000 faces, and
    colours read through trimesh's own UVs and image at face centroids match the function (8-bit + the
    decimated surface's distance from the original points; measured max 0.0052 for both, allowed 0.01)."""
    v, f = bumpy_sphere(4)
    paths = export_textured(v, f, position_colour, tmp_path / "out", texture_size=256, max_faces=2000,
                            progress=False)
    assert [p.name for p in paths] == ["mesh.obj", "mesh.mtl", "mesh.png", "mesh.glb"]
    for path in (paths[0], paths[3]):
        loaded = trimesh.load(path, process=False)
        if isinstance(loaded, trimesh.Scene):
            (loaded,) = loaded.geometry.values()
            image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
        else:
            image = np.asarray(loaded.visual.material.image.convert("RGB"))
        assert len(loaded.faces) <= 2000
        centroids = loaded.vertices[loaded.faces].mean(1)
        colour = sample_bilinear(image, loaded.visual.uv[loaded.faces].mean(1))
        assert np.abs(colour - position_colour(torch.from_numpy(centroids)).numpy()).max() < 0.01
    assert validate_gltf(paths[3])["issues"]["numErrors"] == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(formats=["fbx"]), "unknown textured export format fbx"),
    (dict(texture_size=8), "texture size must be"),
    (dict(max_faces=0), "max_faces must be"),
])
def test_export_textured_rejects_bad_options(tmp_path, kwargs, message):
    v, f = bumpy_sphere(1)
    with pytest.raises(UserError, match=message):
        export_textured(v, f, position_colour, tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


def test_atomic_write_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "a.bin", b"abc")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"abc" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_new_exporters_import_nothing_from_threed():
    """exporters/ takes plain arrays: the textured writers and their helpers must not import threed."""
    root = Path(__file__).resolve().parent.parent / "exporters"
    for name in ("atomic.py", "png.py", "textured_obj.py", "textured_glb.py"):
        tree = ast.parse((root / name).read_text())
        modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [m for m in modules if m.split(".")[0] == "threed"], name


@pytest.mark.cuda
def test_bake_on_cuda_matches_cpu(baked_sphere):
    """Coverage and baking on a GPU give the CPU's texture (float32 colour sums may round differently:
    at most one 8-bit level apart)."""
    v, f, vmapping, uv_faces, uvs, image = baked_sphere
    on_gpu = bake_texture(v, vmapping[uv_faces], uvs, uv_faces, position_colour, size=256, device="cuda",
                          progress=False)
    assert np.abs(on_gpu.astype(int) - image.astype(int)).max() <= 1
    pixels = torch.from_numpy(np.stack([uvs[uv_faces][..., 0] * 256, (1 - uvs[uv_faces][..., 1]) * 256], -1))
    cpu = uv_coverage(pixels, 256, 256)
    gpu = uv_coverage(pixels.cuda(), 256, 256)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
