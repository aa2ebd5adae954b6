"""The Gaussians started from a user's mesh or point cloud (`--method dreamgaussian --init-mesh PATH`,
threed/fields/gaussian_init.py): on the surface, fitted into the scene as Fantasia3D's guide mesh is, with the
file's colours; a missing or empty file is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from threed.cli import main
from threed.config import build_config
from threed.errors import UserError
from threed.fields.gaussian_init import load_init_points
from threed.scenes.gaussians import GaussianScene


def _colour_of(points: np.ndarray) -> np.ndarray:
    """A colour linear in the position (so barycentric interpolation of vertex colours reproduces it)."""
    return np.clip(0.5 + 0.4 * points / np.abs(points).max(), 0, 1)


def _box(path: Path) -> Path:
    """A box 4 x 2 x 1 (x, y, z) centred at (10, -3, 2), vertex colours linear in the centred position."""
    box = trimesh.creation.box(extents=(4.0, 2.0, 1.0))
    colours = (_colour_of(np.asarray(box.vertices)) * 255).round().astype(np.uint8)
    box.visual.vertex_colors = np.concatenate([colours, np.full((len(colours), 1), 255, np.uint8)], 1)
    box.apply_translation((10.0, -3.0, 2.0))
    box.export(path)
    return path


def test_points_lie_on_the_fitted_surface_with_the_mesh_colours(tmp_path: Path) -> None:
    path = _box(tmp_path / "box.ply")
    points, colours = load_init_points(path, 2000, radius=0.5, seed=0)
    p = points.numpy()
    assert p.shape == (2000, 3) and colours is not None
    # fitted: centred, the longest half-side (x: 2) scaled to the radius 0.5 -> the box 0.5 x 0.25 x 0.125
    half = np.array([0.5, 0.25, 0.125])
    assert np.all(np.abs(p) <= half + 1e-5)
    assert np.abs(p).max(axis=0) == pytest.approx(half, abs=0.02)  # the sample reaches the faces
    on_a_face = np.isclose(np.abs(p), half, atol=1e-5).any(axis=1)
    assert on_a_face.all()  # every point on the surface
    # colours carried: the interpolated vertex colours, the position's colour (8-bit vertex colours)
    expected = _colour_of(p * 4.0)  # back to the box's centred frame (scale 2 / 0.5)
    assert np.abs(colours.numpy() - expected).max() < 3 / 255
    # area-weighted: the two 4 x 2 faces hold 16 / 28 of the area
    top_bottom = np.isclose(np.abs(p[:, 2]), 0.125, atol=1e-5).mean()
    assert top_bottom == pytest.approx(16 / 28, abs=0.04)


def _textured_square(path: Path, factor: tuple[float, float, float, float] | None = None) -> Path:
    """A square [-1, 1]^2 in z = 0, UVs along x and y, its texture red on the left half and blue on the right
    (a PBR material with `factor` as its base colour factor where given)."""
    from PIL import Image
    from trimesh.visual.material import PBRMaterial, SimpleMaterial

    vertices = np.array([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    texels = np.zeros((64, 64, 3), np.uint8)
    texels[:, :32, 0] = 255
    texels[:, 32:, 2] = 255
    image = Image.fromarray(texels)
    material = (SimpleMaterial(image=image) if factor is None
                else PBRMaterial(baseColorTexture=image, baseColorFactor=factor))
    visual = trimesh.visual.TextureVisuals(uv=(vertices[:, :2] + 1) / 2, material=material)
    trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False).export(path)
    return path


@pytest.mark.parametrize("name, factor, red", [("square.obj", None, 1.0), ("square.glb", (0.5, 1.0, 1.0, 1.0), 0.5)])
def test_a_textured_mesh_gives_each_point_its_texel(tmp_path: Path, name: str, factor, red: float) -> None:
    """The texture read at each point's UV (times the glTF base colour factor), not one colour per vertex (the
    square's four corners sit on the texture's edges, so per-vertex sampling would give no half its colour)."""
    points, colours = load_init_points(_textured_square(tmp_path / name, factor), 1000, radius=0.5, seed=0)
    assert colours is not None
    x, c = points.numpy()[:, 0], colours.numpy()
    left, right = x < -0.02, x > 0.02  # a texel (1/64 of the square) away from the seam
    assert left.sum() > 400 and right.sum() > 400
    assert np.allclose(c[left], [red, 0.0, 0.0], atol=1 / 255)
    assert np.allclose(c[right], [0.0, 0.0, 1.0], atol=1 / 255)


def test_face_colours_are_carried(tmp_path: Path) -> None:
    box = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    box.visual.face_colors = np.where(box.triangles_center[:, :1] > 0.99, [0, 255, 0, 255], [255, 255, 255, 255])
    box.export(tmp_path / "box.ply")
    points, colours = load_init_points(tmp_path / "box.ply", 600, radius=0.5, seed=0)
    green = np.isclose(points.numpy()[:, 0], 0.5, atol=1e-5)
    assert green.any() and (~green).any()
    assert np.allclose(colours.numpy()[green], [0, 1, 0]) and np.allclose(colours.numpy()[~green], 1.0)


def test_axes_are_turned_and_a_point_cloud_keeps_its_points_and_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-1, 1, size=(300, 3)) * (0.5, 0.5, 3.0)  # tall along z
    colours = rng.integers(0, 256, size=(300, 3)).astype(np.uint8)
    cloud = trimesh.PointCloud(xyz, colors=np.concatenate([colours, np.full((300, 1), 255, np.uint8)], 1))
    path = tmp_path / "cloud.ply"
    cloud.export(path)
    points, got = load_init_points(path, 5000, radius=0.8, up="+z", front="-y")
    assert points.shape == (300, 3) and got is not None  # every point of a cloud smaller than n
    p = points.numpy()
    # +z (the tall axis) is now +y; its extent is the radius
    assert np.abs(p[:, 1]).max() == pytest.approx(0.8, abs=1e-5)
    assert np.abs(p[:, [0, 2]]).max() < 0.8 * 0.5 / 3.0 + 0.01
    centre = (xyz.min(0) + xyz.max(0)) / 2
    assert np.allclose(p[:, 1], (xyz[:, 2] - centre[2]) * 0.8 / np.abs(xyz[:, 2] - centre[2]).max(), atol=1e-5)
    assert np.allclose(got.numpy(), colours / 255.0, atol=1e-6)
    # a cloud larger than n: a subset of n of its points
    fewer, _ = load_init_points(path, 100, radius=0.8)
    assert fewer.shape == (100, 3)


def test_the_gaussian_scene_starts_from_the_mesh(tmp_path: Path) -> None:
    path = _box(tmp_path / "box.obj")
    cfg = build_config("dreamgaussian", [f"gaussians.init_mesh={path}", "gaussians.num_points=500", "device=cpu"])
    scene = GaussianScene(cfg, "cpu")
    gs = scene.gaussians
    assert len(gs) == 500
    assert float(gs.means.detach().abs().max()) <= 0.5 + 1e-5
    assert torch.allclose(gs.opacities, torch.full((500,), 0.1), atol=1e-6)
    assert float(gs.colors.detach().std(0).min()) > 0.05  # the box's colours, not the ball's grey
    assert torch.allclose(gs.quaternions[:, 0], torch.ones(500))


def test_a_missing_or_empty_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.ply").write_bytes(b"")
    for name, words in (("missing.obj", "not found"), ("empty.ply", "is empty")):
        code = main(["run", "--method", "dreamgaussian", "--prompt", "a duck", "--init-mesh", str(tmp_path / name),
                     "--device", "cpu", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "--init-mesh" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
    (tmp_path / "none.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\n"
                                       "property float y\nproperty float z\nend_header\n")
    with pytest.raises(UserError, match="holds no points"):
        load_init_points(tmp_path / "none.ply", 10, 0.5)


def test_init_mesh_goes_to_the_gaussians_for_dreamgaussian(tmp_path: Path) -> None:
    """--init-mesh means gaussians.init_mesh for dreamgaussian (also named through its preset) and
    geometry.init.mesh for fantasia3d."""
    import argparse

    from threed.cli import _fantasia3d_options

    path = _box(tmp_path / "box.obj")
    for method, preset, key in (("dreamgaussian", None, "gaussians.init_mesh"),
                                (None, "dreamgaussian-image", "gaussians.init_mesh"),
                                ("fantasia3d", None, "geometry.init.mesh")):
        args = argparse.Namespace(method=method, preset=preset, init_mesh=str(path), init_mesh_up="+z",
                                  init_mesh_front=None, env_map=None, overrides=[])
        _fantasia3d_options(args)
        assert f"{key}={path.resolve()}" in args.overrides and f"{key}_up=+z" in args.overrides
