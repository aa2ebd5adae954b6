"""Exporters: OBJ / PLY / GLB round trips through trimesh, glTF validity, video and image grids."""

from __future__ import annotations

import json
import struct

import imageio.v3 as iio
import numpy as np
import pygltflib
import pytest
import trimesh
import trimesh.exchange.obj
import trimesh.exchange.ply

from exporters.glb import srgb_to_linear
from exporters import (EXPORTERS, UnknownFormatError, check_formats, export_mesh, write_glb, write_image_grid,
                       write_obj, write_ply, write_video)
from exporters.arrays import MeshArrays, mesh_arrays
from exporters.glb import glb_bytes
from helpers_gltf import validate_gltf


def make_mesh(colors: bool = True, normals: bool = True) -> MeshArrays:
    """A closed icosphere with random vertex colours (seeded), as the plain arrays exporters take:
    `write_obj(path, *mesh)` is `write_obj(path, vertices, faces, colors, normals)`."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    v = np.asarray(sphere.vertices, dtype=np.float32) + np.float32([0.1, -0.2, 0.3])
    f = np.asarray(sphere.faces, dtype=np.int64)
    rng = np.random.default_rng(0)
    return MeshArrays(v, f, rng.random((len(v), 3)).astype(np.float32) if colors else None,
                      np.asarray(sphere.vertex_normals, dtype=np.float32) if normals else None)


@pytest.fixture
def mesh() -> MeshArrays:
    return make_mesh()


def load(path, **kwargs) -> trimesh.Trimesh:
    """The single mesh in `path`, in file order (a GLB loads as a scene, which keeps its vertex colours)."""
    loaded = trimesh.load(path, process=False, maintain_order=True, **kwargs)
    if isinstance(loaded, trimesh.Scene):
        (loaded,) = loaded.geometry.values()
    return loaded


def raw_normals(path) -> np.ndarray:
    """Normals as stored in the file (a loaded Trimesh recomputes its own)."""
    if str(path).endswith(".ply"):
        with open(path, "rb") as f:
            return np.asarray(trimesh.exchange.ply.load_ply(f)["vertex_normals"])
    with open(path) as f:
        (geometry,) = trimesh.exchange.obj.load_obj(f)["geometry"].values()
    return np.asarray(geometry["vertex_normals"])


def test_obj_round_trip(mesh, tmp_path):
    """Positions are written with 6 decimals (error <= 5e-7), colours with 4 and read back as uint8."""
    path = write_obj(tmp_path / "mesh.obj", *mesh)
    # Vertex colours: trimesh prefers a material over them, so read them with materials skipped.
    loaded = load(path, skip_materials=True)
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    np.testing.assert_allclose(loaded.visual.vertex_colors[:, :3] / 255.0, mesh.colors, atol=1.0 / 255 + 1e-6)
    np.testing.assert_allclose(raw_normals(path), mesh.normals, atol=1e-5)  # 5 decimals written
    # With materials: the MTL beside it is found and is plain white.
    textured = load(path)
    assert (tmp_path / "mesh.mtl").exists()
    np.testing.assert_array_equal(textured.visual.material.diffuse[:3], [255, 255, 255])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.mtl", "mesh.obj"]  # no temp files left


def test_ply_round_trip(mesh, tmp_path):
    path = write_ply(tmp_path / "mesh.ply", *mesh)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.vertices, mesh.vertices)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], np.round(mesh.colors * 255).astype(np.uint8))
    np.testing.assert_array_equal(raw_normals(path), mesh.normals)


def test_glb_round_trip_and_structure(mesh, tmp_path):
    path = write_glb(tmp_path / "mesh.glb", *mesh)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.vertices, mesh.vertices)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    colors = np.asarray(loaded.visual.vertex_attributes["color"], dtype=np.float64)
    # glTF's COLOR_0 is linear: the sRGB albedo is decoded (0.5 -> 0.214, 0.04 -> 0.04 / 12.92)
    np.testing.assert_allclose(colors[:, :3], srgb_to_linear(mesh.colors), atol=1e-6)
    np.testing.assert_allclose(srgb_to_linear(np.array([0.0, 0.04, 0.5, 1.0])),
                               [0.0, 0.04 / 12.92, 0.21404114, 1.0], atol=1e-7)

    gltf = pygltflib.GLTF2().load(str(path))
    assert gltf.asset.generator == "threed" and gltf.asset.version == "2.0"
    prim = gltf.meshes[0].primitives[0]
    position = gltf.accessors[prim.attributes.POSITION]
    np.testing.assert_allclose(position.min, mesh.vertices.min(axis=0), rtol=1e-7)
    np.testing.assert_allclose(position.max, mesh.vertices.max(axis=0), rtol=1e-7)
    assert prim.attributes.NORMAL is not None and prim.attributes.COLOR_0 is not None
    normals = gltf.binary_blob()[gltf.bufferViews[gltf.accessors[prim.attributes.NORMAL].bufferView].byteOffset:]
    np.testing.assert_allclose(np.frombuffer(normals, "<f4", count=mesh.normals.size).reshape(-1, 3), mesh.normals,
                               atol=1e-7)
    assert gltf.accessors[prim.indices].componentType == pygltflib.UNSIGNED_INT
    pbr = gltf.materials[prim.material].pbrMetallicRoughness
    assert (pbr.metallicFactor, pbr.roughnessFactor, pbr.baseColorFactor) == (0.0, 1.0, [1.0, 1.0, 1.0, 1.0])
    assert all(view.byteOffset % 4 == 0 and view.target is not None for view in gltf.bufferViews)
    data = path.read_bytes()
    json_length = struct.unpack_from("<I", data, 12)[0]
    assert len(data) % 4 == 0 and json_length % 4 == 0
    assert struct.unpack_from("<I", data, 8)[0] == len(data)


@pytest.mark.parametrize("colors,normals", [(True, True), (False, False)])
def test_glb_passes_khronos_validator(tmp_path, colors, normals):
    path = write_glb(tmp_path / "mesh.glb", *make_mesh(colors, normals))
    report = validate_gltf(path)
    issues = report["issues"]
    assert issues["numErrors"] == 0, issues["messages"]
    assert issues["numWarnings"] == 0, issues["messages"]
    assert report["info"]["totalTriangleCount"] == len(make_mesh().faces)


def test_validator_reports_a_broken_glb(mesh, tmp_path):
    """The harness must see errors: a GLB whose POSITION bounds are wrong is rejected."""
    data = glb_bytes(*mesh)
    json_length = struct.unpack_from("<I", data, 12)[0]
    document = json.loads(data[20:20 + json_length])
    document["accessors"][0]["max"] = [0.0, 0.0, 0.0]
    text = json.dumps(document).encode()
    text += b" " * (-len(text) % 4)
    binary = data[20 + json_length:]
    broken = struct.pack("<III", 0x46546C67, 2, 20 + len(text) + len(binary)) + struct.pack(
        "<II", len(text), 0x4E4F534A) + text + binary
    path = tmp_path / "broken.glb"
    path.write_bytes(broken)
    assert validate_gltf(path)["issues"]["numErrors"] > 0


def test_meshes_without_colours_or_normals(tmp_path):
    bare = make_mesh(colors=False, normals=False)
    for fmt in ("obj", "ply", "glb"):
        loaded = load(EXPORTERS[fmt](tmp_path / f"bare.{fmt}", bare.vertices, bare.faces))
        np.testing.assert_allclose(loaded.vertices, bare.vertices, atol=1e-6)
        np.testing.assert_array_equal(loaded.faces, bare.faces)


def test_export_mesh_writes_each_format(mesh, tmp_path):
    paths = export_mesh(tmp_path / "out", [".OBJ", "glb", "ply", "obj"], *mesh)
    assert [p.name for p in paths] == ["mesh.obj", "mesh.mtl", "mesh.glb", "mesh.ply"]  # every file written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert all(p.stat().st_size > 0 for p in paths)


def test_unknown_format_is_a_plain_value_error_before_anything_is_written(mesh, tmp_path):
    """exporters know nothing of threed's UserError: the caller turns this ValueError into its own message."""
    with pytest.raises(UnknownFormatError, match="stl: choose from obj, glb, ply") as err:
        export_mesh(tmp_path / "bad", ["glb", "stl"], *mesh)
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / "bad").exists()
    assert check_formats(["GLB", ".ply", "glb"]) == ["glb", "ply"]


@pytest.mark.parametrize("change, message", [
    (lambda m: m._replace(faces=m.faces + 1), "index vertices that do not exist"),
    (lambda m: m._replace(faces=-m.faces), "index vertices that do not exist"),
    (lambda m: m._replace(vertices=m.vertices[:, :2]), r"vertices must be an \(N, 3\) array"),
    (lambda m: m._replace(faces=m.faces.reshape(-1, 2)), "faces must be an"),
    (lambda m: m._replace(colors=m.colors[:-1]), "colors must be an"),
    (lambda m: m._replace(normals=m.normals[:, :1]), "normals must be an"),
])
def test_arrays_that_are_not_a_mesh_are_rejected_before_writing(mesh, tmp_path, change, message):
    bad = change(mesh)
    for fmt, writer in EXPORTERS.items():
        with pytest.raises(ValueError, match=message):
            writer(tmp_path / f"bad.{fmt}", *bad)
    assert list(tmp_path.iterdir()) == []


def test_arrays_are_converted_and_colours_clipped():
    m = make_mesh()
    out = mesh_arrays(m.vertices.astype(np.float64), m.faces.astype(np.int32), m.colors * 3 - 1, m.normals)
    assert out.vertices.dtype == np.float32 and out.faces.dtype == np.int64
    assert out.colors.min() == 0.0 and out.colors.max() == 1.0
    np.testing.assert_array_equal(out.colors, np.clip(m.colors * 3 - 1, 0, 1).astype(np.float32))


def test_video_is_readable_with_frame_count(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(5)]
    path = write_video(frames, tmp_path / "turntable.mp4", fps=10)
    read = np.stack(list(_ffmpeg_frames(path)))
    assert read.shape == (5, 32, 48, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["turntable.mp4"]


def test_video_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="multiples of 16"):
        write_video([np.zeros((30, 32, 3), np.uint8)] * 2, tmp_path / "bad.mp4", fps=10)
    with pytest.raises(ValueError, match="differ"):
        write_video([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)], tmp_path / "bad.mp4", 10)
    assert list(tmp_path.iterdir()) == []


def test_image_grid_tiles_row_major(tmp_path):
    images = [np.full((16, 24, 3), 40 * i, np.uint8) for i in range(5)]
    path = write_image_grid(images, tmp_path / "grid.png", cols=3)
    grid = iio.imread(path)
    assert grid.shape == (2 * 16, 3 * 24, 3)
    for n, image in enumerate(images):
        r, c = divmod(n, 3)
        np.testing.assert_array_equal(grid[r * 16:(r + 1) * 16, c * 24:(c + 1) * 24], image)
    assert (grid[16:, 48:] == 0).all()  # the sixth cell is empty


def _ffmpeg_frames(path):
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        yield from reader
    finally:
        reader.close()
