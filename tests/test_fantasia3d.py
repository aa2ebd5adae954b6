"""Fantasia3D (threed/methods/fantasia3d.py): its stages end to end on the tiny Stable Diffusion and the oracle
prior (resume included), the surface kept bit for bit by the appearance stage, the PBR export, the SDF
initialiser's sphere and guide-mesh starts, and the one-line errors of --init-mesh and --env-map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh

import shapes
from helpers_gltf import validate_gltf
from threed.cli import main
from threed.config import SDFInitConfig, build_config
from threed.fields.sdf_init import fit_guide_mesh, initial_sdf
from threed.fields.tetgrid import TetGrid
from threed.render.hdr import write_hdr

TINY = ["geometry.steps=3", "geometry.latent_steps=2", "geometry.resolution=16", "geometry.width=32",
        "geometry.height=32", "appearance.steps=2", "appearance.resolution=16", "appearance.width=32",
        "appearance.height=32", "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12",
        "export.texture_size=64", "export.video=false", "export.preview_views=2", "log_every=1",
        "checkpoint_every=2"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_preset_takes_threestudios_fantasia3d_values():
    cfg = build_config("fantasia3d")
    g, a = cfg.geometry, cfg.appearance
    assert (g.steps, g.resolution, g.width, g.shading, g.latent_steps, g.init.radius) == (10000, 128, 512, "normal",
                                                                                          1000, 0.5)
    assert (g.lr_sdf.start, g.t_max.start, g.guidance_scale, cfg.guidance.weighting) == (0.001, 0.5, 100.0, "fantasia3d")
    assert (a.steps, a.shading, a.lr_texture.start, a.lr_sdf.start, a.weighting) == (5000, "pbr", 0.01, 0.0, "sds")
    assert (a.t_min.start, a.t_max.start, a.env_scale, a.roughness, a.metallic) == (0.02, 0.5, 2.0, (0.08, 0.9),
                                                                                    (0.0, 0.9))
    assert (g.distance, g.fovy, g.elevation) == ((3.0, 3.0), (25.0, 45.0), (-10.0, 45.0))


def test_fantasia3d_run_on_the_tiny_stable_diffusion(tiny_sd_dir, tmp_path, capsys):
    """Both stages on the tiny SD: the warm-up steps feed the normal-and-mask image as the latent, the later
    ones the encoded normal map; the appearance stage keeps the surface bit for bit and trains a material that
    is exported with its metallic-roughness texture; --resume with more appearance steps continues it."""
    out = tmp_path / "vase"
    code = main(["run", "--method", "fantasia3d", "--prompt", "a vase", "--model", str(tiny_sd_dir), "--device",
                 "cpu", "--out", str(out), "--quiet", "guidance.sd.resolution=32", *TINY])
    assert code == 0, capsys.readouterr().err
    records = _records(out)
    geometry = [r for r in records if "loss" in r and r.get("stage") == "geometry"]
    appearance = [r for r in records if "loss" in r and r.get("stage") == "appearance"]
    assert [r["step"] for r in geometry] == [1, 2, 3] and [r["step"] for r in appearance] == [4, 5]
    for name in ["mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "mesh_roughness.png", "mesh_metallic.png",
                 "mesh-geometry.obj"]:
        assert (out / name).is_file(), name
    shaped = torch.load(out / "checkpoints" / "geometry" / "step-000003.pt", weights_only=False)
    lit = torch.load(out / "checkpoints" / "appearance" / "step-000002.pt", weights_only=False)
    assert shaped["geometry"].keys() == lit["geometry"].keys()
    for key in shaped["geometry"]:  # the SDF network's parameters and the start's values
        assert torch.equal(shaped["geometry"][key], lit["geometry"][key]), key
    assert validate_gltf(out / "mesh.glb")["issues"]["numErrors"] == 0

    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--quiet", "appearance.steps=3"]) == 0, capsys.readouterr().err
    appearance = [r for r in _records(out) if "loss" in r and r.get("stage") == "appearance"]
    assert [r["step"] for r in appearance] == [4, 5, 6]
    again = torch.load(out / "checkpoints" / "appearance" / "step-000003.pt", weights_only=False)
    assert all(torch.equal(again["geometry"][k], shaped["geometry"][k]) for k in shaped["geometry"])


def test_fantasia3d_run_under_the_oracle_with_a_guide_mesh_and_an_environment(tmp_path, capsys):
    """The oracle prior renders the reference's normal maps, normal-and-mask latents and PBR renders under the
    same environment; --init-mesh starts the surface from a guide mesh, --env-map lights it."""
    reference = shapes.save(shapes.peanut(resolution=32, max_faces=1500), tmp_path / "peanut.ply")
    guide = shapes.save(shapes.ellipsoid(subdivisions=2), tmp_path / "guide.ply")
    dirs = np.linspace(0.2, 1.0, 16 * 32 * 3, dtype=np.float32).reshape(16, 32, 3)
    env = write_hdr(tmp_path / "sky.hdr", dirs)
    out = tmp_path / "run"
    code = main(["run", "--method", "fantasia3d", "--guidance", "oracle", "--reference", str(reference),
                 "--init-mesh", str(guide), "--env-map", str(env), "--out", str(out), "--quiet",
                 "guidance.oracle.views=1", *TINY])
    assert code == 0, capsys.readouterr().err
    cfg = build_config(base=__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.geometry.init.mesh == str(guide.resolve()) and cfg.appearance.env_map == str(env.resolve())
    assert all(np.isfinite(r["loss"]) for r in _records(out) if "loss" in r)
    scene = trimesh.load(out / "mesh.glb", process=False)
    (mesh,) = scene.geometry.values()
    assert mesh.visual.material.metallicRoughnessTexture is not None


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "guide mesh '{p}' not found"),
    (lambda p: p.write_bytes(b""), "guide mesh '{p}' is empty"),
])
def test_init_mesh_missing_or_empty_is_one_line(tmp_path, capsys, setup, message):
    path = tmp_path / "guide.obj"
    setup(path)
    code = main(["run", "--method", "fantasia3d", "--guidance", "oracle", "--reference", str(path),
                 "--init-mesh", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message.format(p=path) in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_env_map_unreadable_is_one_line(tmp_path, capsys):
    path = tmp_path / "sky.hdr"
    path.write_bytes(b"not an image")
    code = main(["run", "--method", "fantasia3d", "--prompt", "a vase", "--env-map", str(path),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "not a Radiance .hdr image" in err and len(err.splitlines()) == 1


def test_sdf_initialiser_sphere_and_fitted_guide_mesh(tmp_path):
    """The sphere's SDF is exact; a guide mesh is centred, turned so its named up and front axes become +y and
    +z, and scaled to mesh_scale of the bound; its surface on the grid lies within a cell of the fitted box."""
    grid = TetGrid.cube(32, 1.0)
    sdf = initial_sdf(SDFInitConfig(radius=0.4), grid, 1.0)
    assert torch.allclose(sdf, grid.vertices().norm(dim=-1) - 0.4)
    # a box long along its z (its "up"), deep along x (its "front"), offset from the origin
    box = trimesh.creation.box((0.3, 0.2, 0.8))
    box.apply_translation((2.0, -1.0, 0.5))
    fitted = fit_guide_mesh(box.vertices, "+z", "+x", 0.9, 1.0)
    extent = fitted.max(axis=0)
    assert np.allclose(fitted.min(axis=0), -extent) and np.allclose(extent, [0.225, 0.9, 0.3375])
    path = tmp_path / "box.obj"
    box.export(path)
    sdf = initial_sdf(SDFInitConfig(mesh=str(path), mesh_up="+z", mesh_front="+x"), grid, 1.0)
    inside = grid.vertices()[sdf < 0]
    cell = grid.cell_size
    assert (inside.abs().max(dim=0).values.numpy() <= extent + cell).all()
    assert (inside.abs().max(dim=0).values.numpy() >= extent - 1.5 * cell).all()


def test_oracle_pbr_reference_matches_the_scenes_pbr_render(tmp_path):
    """The oracle's PBR reference and the mesh scene's PBR render of the same surface and material agree, so
    a field at the answer gets no pull: a sphere's DMTet surface, exported and given to the oracle as its
    reference with the albedo, roughness and metallic the scene's material is held at. Inside the silhouette
    (pixels whose 5x5 neighbourhood is all covered: the rasterizer's antialiasing and the oracle's 2x
    supersampling differ at the edge) the measured largest difference over 1941 pixels is 0.056 and the mean
    0.0020 (the scene's interpolated vertex normals against the raycast's corner normals, sharpest at the
    sun's highlight); bounds 0.1 and 0.005."""
    from threed.cameras import make_cameras
    from threed.guidance.oracle import OracleGuidance
    from threed.stages import mesh_stage_config

    cfg = build_config("fantasia3d-oracle", ["geometry.resolution=48", "appearance.resolution=48",
                                             "guidance.oracle.views=1", "guidance.oracle.roughness=0.35",
                                             "guidance.oracle.metallic=0.6", "guidance.oracle.color=[0.7,0.5,0.3]"])
    from threed.scenes.mesh import MeshScene

    geometry_cfg = mesh_stage_config(cfg, "geometry")
    shaped = MeshScene.from_shape(geometry_cfg, "cpu")
    stage_cfg = mesh_stage_config(cfg, "appearance")
    scene = MeshScene.from_geometry(stage_cfg, shaped.state_dict(), "cpu")
    constant = torch.tensor([[0.7, 0.5, 0.3, 0.35, 0.6]])
    scene.texture.material = lambda p: constant.expand(len(p), 5)
    exported = scene.export_mesh()
    reference = tmp_path / "sphere.ply"
    trimesh.Trimesh(exported.mesh.vertices, exported.mesh.faces, process=False).export(reference)
    stage_cfg.guidance.oracle.reference = str(reference)
    oracle = OracleGuidance(stage_cfg, "cpu")
    oracle.colors = torch.tensor([[0.7, 0.5, 0.3]]).expand(len(oracle.vertices), 3)  # the material's albedo
    cams = make_cameras(torch.tensor([20.0, -5.0]), torch.tensor([30.0, 200.0]), torch.tensor([3.0, 3.0]),
                        torch.tensor([30.0, 30.0]), 64, 64)
    with torch.no_grad():
        out = scene.render(cams, "pbr")
        ref = oracle.render_reference(cams, "pbr", out.background)
    covered = torch.nn.functional.max_pool2d((out.opacity[..., 0] < 0.999).float()[:, None], 5, 1, 2)[:, 0] == 0
    diff = (out.rgb - ref).abs()[covered]
    assert covered.sum() > 400
    assert float(diff.max()) < 0.1 and float(diff.mean()) < 0.005


def test_init_mesh_belongs_to_a_geometry_stage_that_follows_no_nerf(tmp_path, capsys):
    """ProlificDreamer's geometry stage starts from its NeRF: a guide mesh there would be ignored, so it is an
    error naming the method that takes it."""
    guide = shapes.save(shapes.sphere(subdivisions=1), tmp_path / "guide.ply")
    code = main(["run", "--method", "prolificdreamer", "--prompt", "a vase", "--init-mesh", str(guide),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--method fantasia3d" in err and len(err.splitlines()) == 1


def test_an_sdf_network_belongs_to_a_geometry_stage_that_follows_no_nerf(tmp_path, capsys):
    """ProlificDreamer's geometry stage takes the NeRF's surface as values on its grid: geometry.sdf_network
    would be ignored there, so it is an error naming the method that reads it."""
    code = main(["run", "--method", "prolificdreamer", "--prompt", "a vase", "geometry.sdf_network=true",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "geometry.sdf_network" in err and "--method fantasia3d" in err and len(err.splitlines()) == 1
