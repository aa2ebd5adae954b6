"""`threed run --method magic3d` and `--method magic3d-refine --from` end to end on tiny random models (the
real pipeline, tiny sizes), stage-by-stage resume, and every bad input ending in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh

from helpers_gltf import validate_gltf
from threed.cli import main
from threed.config import save_config
from threed.pipeline import load_run_config
from threed.spec import RunOptions, resolve

# The tiny sizes of tests/test_cli.py for the NeRF stage, and a small mesh stage.
TINY = ["render.width=16", "render.height=16", "render.num_samples=24", "render.occupancy_resolution=16",
        "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12", "guidance.sd.resolution=32",
        "export.resolution=32", "export.video_frames=4", "export.video_resolution=32", "export.preview_views=2",
        "log_every=1", "checkpoint_every=2"]
TINY_MESH = ["mesh.steps=2", "mesh.resolution=16", "mesh.width=32", "mesh.height=32", "export.texture_size=64"]

slow = pytest.mark.slow  # tests on the two training fixtures (~1 min together on a shared 2-core CPU)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def magic3d_run(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("m3d") / "duck"
    code = main(["run", "--method", "magic3d", "--prompt", "a yellow rubber duck", "--preset", "magic3d-cpu",
                 "--model", str(tiny_sd_dir), "--steps", "2", "--device", "cpu", "--out", str(out), "--quiet",
                 *TINY, *TINY_MESH])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def coarse_run(tiny_sd_dir, tmp_path_factory):
    """A finished DreamFusion run to refine."""
    out = tmp_path_factory.mktemp("coarse") / "duck"
    code = main(["run", "--prompt", "a yellow rubber duck", "--preset", "cpu-tiny", "--model", str(tiny_sd_dir),
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--quiet", *TINY])
    assert code == 0
    return out


@slow
def test_magic3d_writes_both_stages(magic3d_run):
    out = magic3d_run
    for name in ["config.yaml", "metrics.jsonl", "mesh.obj", "mesh.mtl", "mesh.png", "mesh.glb", "mesh.json",
                 "mesh-nerf.obj", "mesh-nerf.mtl", "mesh-nerf.glb", "turntable.mp4", "preview.png",
                 "report.html"]:
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints" / "nerf").glob("*.pt"))] == ["step-000002.pt"]
    assert [p.name for p in sorted((out / "checkpoints" / "mesh").glob("*.pt"))] == ["step-000002.pt"]
    recs = records(out)
    steps = [(r.get("stage", "nerf"), r["step"]) for r in recs if "loss" in r]
    assert steps == [("nerf", 1), ("nerf", 2), ("mesh", 3), ("mesh", 4)]  # the mesh stage continues the step axis
    assert all(np.isfinite(r["loss"]) and "loss_normal_consistency" in r for r in recs if r.get("stage") == "mesh")
    assert all(0.02 <= r["t"] <= 0.5 + 1e-3 for r in recs if r.get("stage") == "mesh")  # the stage's t range
    stage_done = [r for r in recs if r.get("stage_done")]
    assert len(stage_done) == 1 and stage_done[0]["stage"] == "nerf" and stage_done[0]["step"] == 2
    final = recs[-1]
    assert final["done"] and final["step"] == 4
    for key in ("nerf_wall_time_s", "nerf_it_per_s", "mesh_wall_time_s", "mesh_it_per_s", "mesh_init_time_s"):
        assert final[key] > 0, key
    assert final["wall_time_s"] == pytest.approx(final["nerf_wall_time_s"] + final["mesh_wall_time_s"], abs=0.01)
    meshes = json.loads((out / "mesh.json").read_text())["meshes"]  # one entry per mesh file
    coarse_info, fine_info = meshes["mesh-nerf.obj"], meshes["mesh.obj"]
    assert coarse_info["stage"] == "nerf" and coarse_info["threshold"] > 0 and coarse_info["step"] == 2
    assert fine_info["stage"] == "mesh" and fine_info["step"] == 2 and fine_info["texture_size"] == 64
    page = (out / "report.html").read_text()
    assert "mesh-nerf.glb" in page and "step 4 of 4" in page


def assert_textured(folder, name="mesh"):
    """OBJ + MTL + PNG with UVs, and a GLB whose material's base colour is an embedded texture."""
    import pygltflib

    obj = trimesh.load(folder / f"{name}.obj", force="mesh")
    assert len(obj.faces) > 0 and obj.visual.kind == "texture" and obj.visual.uv.shape == (len(obj.vertices), 2)
    assert "map_Kd" in (folder / f"{name}.mtl").read_text() and (folder / f"{name}.png").is_file()
    gltf = pygltflib.GLTF2().load(str(folder / f"{name}.glb"))
    assert gltf.materials[0].pbrMetallicRoughness.baseColorTexture is not None and len(gltf.images) == 1
    assert gltf.meshes[0].primitives[0].attributes.TEXCOORD_0 is not None
    assert validate_gltf(folder / f"{name}.glb")["issues"]["numErrors"] == 0


@slow
def test_magic3d_meshes_load_and_validate(magic3d_run):
    """mesh.* (the mesh stage's) are textured, as the magic3d presets say; mesh-nerf.* keep vertex colours."""
    import pygltflib

    assert_textured(magic3d_run)
    coarse = trimesh.load(magic3d_run / "mesh-nerf.obj", force="mesh", skip_materials=True)
    glb = trimesh.load(magic3d_run / "mesh-nerf.glb", force="mesh")
    assert len(coarse.faces) > 0 and len(glb.faces) == len(coarse.faces)
    assert pygltflib.GLTF2().load(str(magic3d_run / "mesh-nerf.glb")).meshes[0].primitives[0].attributes.COLOR_0
    assert validate_gltf(magic3d_run / "mesh-nerf.glb")["issues"]["numErrors"] == 0


@slow
def test_magic3d_resumes_per_stage(magic3d_run, capsys):
    out = magic3d_run
    code, stdout, _ = run_cli(["run", "--resume", out], capsys)
    assert code == 0 and "is finished (nerf stage step 2 of 2; mesh stage step 2 of 2)" in stdout
    assert "mesh.steps=N" in stdout
    code, _, err = run_cli(["run", "--resume", out, "--steps", "4"], capsys)
    assert code == 2 and "--steps cannot change the nerf stage" in err and "mesh.steps=N" in err
    code, _, err = run_cli(["run", "--resume", out, "mesh.steps=3", "--quiet"], capsys)
    assert code == 0, err
    assert [p.name for p in sorted((out / "checkpoints" / "mesh").glob("*.pt"))][-1] == "step-000003.pt"
    assert [p.name for p in sorted((out / "checkpoints" / "nerf").glob("*.pt"))] == ["step-000002.pt"]  # NeRF untouched
    final = records(out)[-1]
    assert final["done"] and final["step"] == 5 and final["segment_steps"] == 1
    assert "nerf_wall_time_s" in final  # the NeRF stage's numbers, from its record of the first segment


@slow
def test_export_of_a_magic3d_run_is_its_mesh_stage(magic3d_run, capsys):
    code, stdout, _ = run_cli(["export", magic3d_run, "--format", "ply"], capsys)
    assert code == 0 and "mesh.ply" in stdout
    assert json.loads((magic3d_run / "mesh.json").read_text())["meshes"]["mesh.ply"]["stage"] == "mesh"
    code, _, err = run_cli(["export", magic3d_run, "--resolution", "64"], capsys)
    assert code == 2 and "mesh stage (DMTet)" in err


@slow
def test_refine_a_finished_coarse_run(coarse_run, tiny_sd_dir, capsys):
    code, stdout, err = run_cli(["run", "--method", "magic3d-refine", "--from", coarse_run, "--preset", "magic3d-cpu",
                                 "--device", "cpu", "--quiet", *TINY_MESH], capsys)
    assert code == 0, err
    out = coarse_run.parent / "duck-refine"
    assert f"refining {coarse_run} from its NeRF checkpoint step-000002.pt" in stdout and str(out) in stdout
    cfg = load_run_config(out)
    source = load_run_config(coarse_run)
    assert cfg.method == "magic3d-refine" and cfg.steps == 2 and cfg.mesh.steps == 2
    assert (cfg.prompt, cfg.guidance.sd.model, cfg.field) == (source.prompt, source.guidance.sd.model, source.field)
    copied = torch.load(out / "checkpoints" / "nerf" / "step-000002.pt", weights_only=False)
    original = torch.load(coarse_run / "checkpoints" / "nerf" / "step-000002.pt", weights_only=False)
    assert "optimizer" not in copied and copied["copied_from"].endswith("step-000002.pt")
    assert all(torch.equal(copied["field"][k], original["field"][k]) for k in original["field"])
    for name in ("mesh.obj", "mesh.glb", "mesh-nerf.obj", "mesh-nerf.glb", "checkpoints/mesh/step-000002.pt"):
        assert (out / name).is_file(), name
    assert records(out)[0]["copied_from"].endswith("step-000002.pt") and records(out)[-1]["done"]
    # the refined run resumes like any other; the source is left alone
    code, stdout, _ = run_cli(["run", "--resume", out], capsys)
    assert code == 0 and "is finished" in stdout
    code, _, err = run_cli(["run", "--resume", out, "--steps", "3"], capsys)
    assert code == 2 and "it comes from another run" in err
    assert not (coarse_run / "checkpoints" / "mesh").exists() and not (coarse_run / "mesh-nerf.obj").exists()


def test_magic3d_presets_and_method_choice():
    """The GPU preset has Magic3D's / threestudio's magic3d-refine values; --guidance oracle takes the oracle
    preset and a machine without CUDA the CPU one, saying so."""
    from threed import methods
    from threed.config import build_config

    cfg = build_config("magic3d")
    assert cfg.method == "magic3d" and [s.name for s in methods.get("magic3d").stages] == ["nerf", "mesh"]
    assert (cfg.render.width, cfg.steps) == (64, 10000)  # the coarse stage: DreamFusion's
    m = cfg.mesh
    assert (m.width, m.height, m.steps, m.resolution) == (512, 512, 5000, 128)
    assert m.fovy == (30.0, 45.0) and m.distance == (1.5, 2.0) and (m.t_min(0), m.t_max(0)) == (0.02, 0.5)
    assert cfg.guidance.sd.guidance_scale == 101.0 and m.lr_texture(0) == 0.01 and m.lr_background(0) == 0.01
    assert m.deform_scale == 1.0 and m.soft_shading and m.albedo_prob == 0.25
    assert cfg.export.texture

    def budget(c) -> tuple:  # keys whose values differ between the three magic3d presets, so tell them apart
        return c.steps, c.mesh.steps, c.mesh.resolution

    presets = {name: budget(build_config(name)) for name in ("magic3d", "magic3d-oracle", "magic3d-cpu")}
    assert len(set(presets.values())) == 3, presets
    oracle, _ = resolve(RunOptions(method="magic3d", reference="shape.ply"), cuda=True)
    assert oracle.guidance.type == "oracle" and budget(oracle) == presets["magic3d-oracle"]
    cpu, notes = resolve(RunOptions(method="magic3d", prompt="a duck"), cuda=False)
    assert budget(cpu) == presets["magic3d-cpu"] and "magic3d-cpu" in notes[0]


@pytest.mark.parametrize("args, words", [
    (["--from", "NOT_A_RUN"], ["is not a threed run directory", "config.yaml"]),
    (["--from", "NO_CHECKPOINT"], ["has no NeRF checkpoint", "method dreamfusion"]),
    (["--from", "CLIP_RUN"], ["used the clip prior", "--guidance sd"]),
    (["--from", "NO_CHECKPOINT", "--steps", "3"], ["--steps", "mesh.steps=N"]),
    (["--from", "NO_CHECKPOINT", "--method", "dreamfusion"], ["method dreamfusion starts from scratch",
                                                               "--method magic3d-refine"]),
    (["--from", "NO_CHECKPOINT", "--resume", "NO_CHECKPOINT"], ["--from", "--resume"]),
    (["--method", "magic3d-refine", "--prompt", "a duck"], ["magic3d-refine", "--from RUN_DIR"]),
    (["--prompt", "a duck", "mesh.steps=10"], ["mesh.steps", "no mesh stage", "--method magic3d"]),
    (["--method", "magic3d", "--prompt", "a duck", "mesh.shading=shiny"], ["mesh.shading", "albedo"]),
    (["--method", "magic3d", "--prompt", "a duck", "mesh.t_max=1.5"], ["mesh.t_min/t_max"]),
    (["--method", "magic3d", "--guidance", "clip", "--prompt", "a duck"], ["takes the stable_diffusion or oracle"]),
])
def test_bad_refine_and_mesh_input_is_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_checkpoint = tmp_path / "empty-run"
    cfg, _ = resolve(RunOptions(prompt="a duck", preset="cpu-tiny"), cuda=False)
    save_config(cfg, no_checkpoint / "config.yaml")
    clip_run = tmp_path / "clip-run"
    cfg, _ = resolve(RunOptions(prompt="a duck", method="clip"), cuda=False)
    save_config(cfg, clip_run / "config.yaml")
    (clip_run / "checkpoints" / "nerf").mkdir(parents=True)
    (clip_run / "checkpoints" / "nerf" / "step-000010.pt").write_bytes(b"never loaded: the prior is refused first")
    names = {"NOT_A_RUN": tmp_path, "NO_CHECKPOINT": no_checkpoint, "CLIP_RUN": clip_run}
    code, _, err = run_cli(["run", *[names.get(a, a) for a in args]], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threed: error:") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (no_checkpoint.parent / "empty-run-refine").exists()  # nothing written


@slow
def test_textured_export_of_a_nerf_run(coarse_run, capsys):
    """`threed export DIR --texture` works for a DreamFusion run too (its field's albedo, baked)."""
    code, stdout, err = run_cli(["export", coarse_run, "--texture", "--texture-size", "64"], capsys)
    assert code == 0, err
    assert "mesh.png" in stdout
    assert_textured(coarse_run)
    assert json.loads((coarse_run / "mesh.json").read_text())["meshes"]["mesh.glb"]["texture_size"] == 64
    code, _, err = run_cli(["export", coarse_run, "--no-texture", "--texture-size", "64"], capsys)
    assert code == 2 and "--no-texture" in err
