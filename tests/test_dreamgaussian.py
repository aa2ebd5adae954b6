"""`threed run --method dreamgaussian` end to end on a tiny random Stable Diffusion (the real pipeline, tiny
sizes): both stages, the 3DGS .ply, the textured GLB, resume; and the Gaussian stage's checkpoints resuming
bit for bit across densification (the optimiser state follows the rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch

from exporters.splat_ply import read_splat_ply
from helpers_gltf import validate_gltf
from threed import methods
from threed.cli import main
from threed.config import build_config
from threed.errors import UserError
from threed.rundir import RunDir, load_checkpoint
from threed.stages import GAUSSIANS

TINY = ["render.width=16", "render.height=16", "gaussians.num_points=400", "gaussians.grow_steps=[2]",
        "gaussians.grow_sizes=[24]", "gaussians.densify_every=2", "guidance.sd.resolution=32",
        "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12", "export.resolution=32",
        "export.threshold=0.2", "export.video_frames=4", "export.video_resolution=32", "export.preview_views=2",
        "export.texture_size=64", "texture.steps=2", "texture.resolution=16", "texture.width=32",
        "texture.height=32", "gaussians.texture_fit_steps=5", "gaussians.refine_steps=10", "log_every=1", "checkpoint_every=2"]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dg_run(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dg") / "duck"
    code = main(["run", "--method", "dreamgaussian", "--prompt", "a yellow rubber duck", "--model", str(tiny_sd_dir),
                 "--steps", "4", "--device", "cpu", "--out", str(out), "--quiet", *TINY])
    assert code == 0
    return out


def test_dreamgaussian_writes_both_stages_and_the_gaussians(dg_run):
    out = dg_run
    for name in ["config.yaml", "mesh.obj", "mesh.png", "mesh.glb", "mesh-gaussians.obj", "gaussians.ply",
                 "gaussians.png", "turntable.mp4", "preview.png", "report.html"]:
        assert (out / name).is_file(), name
    # the report shows the Gaussians, splatted from export.preview_views views: a ball over the background
    assert 'src="gaussians.png"' in (out / "report.html").read_text()
    picture = np.asarray(Image.open(out / "gaussians.png").convert("RGB")).astype(np.float64)
    side = picture.shape[0]
    assert picture.shape[1] == side * 2 and picture.reshape(side, 2, side, 3).std(axis=(0, 2)).min() > 5
    assert [p.name for p in sorted((out / "checkpoints" / "gaussians").glob("*.pt"))] == ["step-000002.pt",
                                                                                          "step-000004.pt"]
    recs = records(out)
    steps = [(r["stage"], r["step"]) for r in recs if "loss" in r]
    assert steps == [("gaussians", s) for s in (1, 2, 3, 4)] + [("texture", 5), ("texture", 6)]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    final = recs[-1]
    assert final["done"] and final["step"] == 6 and final["gaussians_wall_time_s"] > 0
    meshes = json.loads((out / "mesh.json").read_text())["meshes"]
    assert meshes["mesh-gaussians.obj"]["threshold"] == 0.2 and meshes["mesh-gaussians.obj"]["stage"] == "gaussians"
    assert meshes["mesh.glb"]["stage"] == "texture"
    assert validate_gltf(out / "mesh.glb")["issues"]["numErrors"] == 0
    # the .ply holds the Gaussians of the last checkpoint (densified: more or fewer than the 400 started with)
    splats = read_splat_ply(out / "gaussians.ply")
    state = load_checkpoint(out / "checkpoints" / "gaussians" / "step-000004.pt", "cpu")["gaussians"]
    assert np.array_equal(splats["means"], state["means"].numpy())
    assert np.array_equal(splats["logit_opacities"], state["logit_opacities"].numpy())
    # the texture stage kept the surface: its geometry received no update
    texture_state = load_checkpoint(out / "checkpoints" / "texture" / "step-000002.pt", "cpu")
    assert texture_state["optimizer"]["param_groups"][0]["lr"] > 0  # the texture's group; no geometry group


def test_dreamgaussian_resumes(dg_run, capsys):
    out = dg_run
    code, stdout, _ = run_cli(["run", "--resume", out], capsys)
    assert code == 0 and "is finished" in stdout
    code, _, err = run_cli(["run", "--resume", out, "texture.steps=3", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints" / "texture").glob("*.pt"))[-1] == "step-000003.pt"
    assert records(out)[-1]["step"] == 7


@pytest.mark.parametrize("sh_degree", [0, 2])
def test_gaussian_stage_resumes_exactly_across_densification(tiny_sd_dir, tmp_path, sh_degree):
    """4 steps straight against 2, a checkpoint, and 2 more: the same Gaussians, although densification at
    step 2 changed their number between the two segments; with view-dependent colour too (degree 2, its first
    degree switched on at step 1 and its second at step 2: the resumed segment starts at degree 2)."""
    cfg = build_config("dreamgaussian", [f"guidance.sd.model={tiny_sd_dir}", "device=cpu", "prompt=a duck", *TINY,
                                         "gaussians.grad_threshold=0.0", "checkpoint_every=0",
                                         f"gaussians.sh_degree={sh_degree}", "gaussians.sh_degree_every=1"])
    method = methods.get("dreamgaussian")
    guidance = lambda: method.build_guidance(cfg, "cpu", GAUSSIANS)  # noqa: E731 (its random stream starts afresh)
    straight = GAUSSIANS.trainer(cfg, "cpu", guidance(), RunDir(tmp_path / "a"))
    straight.fit(4, progress=False)
    first = GAUSSIANS.trainer(cfg, "cpu", guidance(), RunDir(tmp_path / "b"))
    first.fit(2, progress=False)
    assert len(first.scene.gaussians) > 400  # a threshold of 0 densifies every Gaussian seen
    resumed = GAUSSIANS.trainer(cfg, "cpu", guidance(), RunDir(tmp_path / "b"))
    assert resumed.step == 2 and len(resumed.scene.gaussians) == len(first.scene.gaussians)
    resumed.fit(4, progress=False)
    for name, p in straight.scene.gaussians.named_groups():
        assert torch.equal(p, getattr(resumed.scene.gaussians, name)), name
    assert straight.scene.sh_active == sh_degree
    if sh_degree:
        assert float(straight.scene.gaussians.f_rest.detach().abs().sum()) > 0  # the higher degrees learnt


def test_bench_takes_dreamgaussian(tmp_path):
    """`threed bench --methods dreamgaussian` plans both stages, with the preset a run would take."""
    from threed.bench import plan as bench_plan
    from threed.cli import parser

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ripe strawberry\n")
    args = parser().parse_args(["bench", "--prompts", str(prompts), "--methods", "dreamgaussian,dreamfusion",
                                "--steps", "3", "--out", str(tmp_path / "b"), "--device", "cpu"])
    entries = {e.method: e for e in bench_plan.make_plan(args, cuda=False)[0]}
    assert entries["dreamgaussian"].budget == [("gaussians", 3), ("texture", 50)]
    assert entries["dreamgaussian"].cfg.gaussians.num_points == 5000


def test_gaussian_stage_background_is_white_or_black_and_the_texture_stage_white():
    """DreamGaussian's invert_bg_prob 0.5: each training render is all white or all black (one draw for the
    render), 400 renders: black is Binomial(400, 0.5), mean 200, sd 10, and a correct rate leaves [160, 240]
    with probability below 1e-4; at evaluation white (render.background_color). Its texture stage renders over
    white throughout (texture.background solid, main2.py's bg_color=1)."""
    from threed.render.background import Background
    from threed.stages import mesh_stage_config

    cfg = build_config("dreamgaussian")
    background = Background(cfg.render).train()
    dirs = torch.nn.functional.normalize(torch.randn(2, 4, 5, 3), dim=-1)
    generator = torch.Generator().manual_seed(0)
    black = 0
    for _ in range(400):
        out = background(dirs, generator)
        assert torch.equal(out, torch.zeros_like(out)) or torch.equal(out, torch.ones_like(out))
        black += int(not out.any())
    assert 160 <= black <= 240
    assert torch.equal(background.eval()(dirs), torch.ones_like(dirs))
    texture = mesh_stage_config(cfg, "texture")
    assert texture.render.background == "solid"
    stage_background = Background(texture.render).train()
    stage_background.take_from(background.state_dict())
    assert torch.equal(stage_background(dirs, generator), torch.ones_like(dirs))


def test_a_stage_background_of_another_kind_starts_fresh():
    """A stage whose background kind differs from the stage before's (mesh.background) keeps its own: the
    learned background's weights are not forced into a solid one."""
    from threed.render.background import Background

    learned = Background(build_config("cpu-tiny").render)
    solid = Background(build_config("cpu-tiny", ["render.background=solid"]).render)
    solid.take_from(learned.state_dict())  # no error: different kinds
    assert solid.mlp is None and torch.equal(solid.color, torch.ones(3))
    other = Background(build_config("cpu-tiny").render)
    other.take_from(learned.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), learned.state_dict().values()))


def test_dreamgaussian_with_mvdream_scores_and_edits_four_view_objects(tmp_path, capsys):
    """`--guidance mvdream` takes dreamgaussian-mvdream (DreamGaussian's text_mv.yaml): a tiny random MVDream
    scores each step's object of 4 views (the Gaussian stage) and edits them (the texture stage's SDEdit), and
    a batch that is not whole objects is one line naming the fix."""
    from tiny_models import build_tiny_mvdream

    from threed.guidance.mvdream import MVDreamGuidance
    from threed.guidance.sdedit import SDEditGuidance
    from threed.stages import GAUSSIAN_TEXTURE, mesh_stage_config

    ckpt = build_tiny_mvdream(tmp_path / "model")
    tiny = [a for a in TINY if not a.startswith("guidance.sd.")] + ["guidance.mvdream.resolution=16"]
    out = tmp_path / "duck"
    code, _, err = run_cli(["run", "--method", "dreamgaussian", "--guidance", "mvdream", "--prompt", "a duck",
                            "--model", ckpt, "--steps", "2", "--device", "cpu", "--out", out, "--quiet", *tiny],
                           capsys)
    assert code == 0, err
    cfg = build_config(base=__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert (cfg.guidance.type, cfg.camera.views, cfg.render.batch_size, cfg.texture.views) == ("mvdream", 4, 4, 4)
    recs = records(out)
    assert [(r["stage"], r["step"]) for r in recs if "loss" in r] == [("gaussians", 1), ("gaussians", 2),
                                                                      ("texture", 3), ("texture", 4)]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in recs if "loss" in r)
    assert (out / "mesh.glb").is_file() and (out / "gaussians.ply").is_file()
    # the texture stage's guidance: SDEdit over MVDream, whole objects only
    stage_cfg = mesh_stage_config(cfg, "texture")
    guidance = methods.get("dreamgaussian").build_guidance(stage_cfg, "cpu", GAUSSIAN_TEXTURE)
    assert isinstance(guidance, SDEditGuidance) and isinstance(guidance.prior, MVDreamGuidance)
    from threed.cameras import orbit_cameras

    cams = orbit_cameras(stage_cfg.camera, 4, 16, 16)
    rgb = torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    edit = guidance.refine(rgb, cams, 0)
    assert edit.shape == rgb.shape and 0 <= float(edit.min()) and float(edit.max()) <= 1
    with pytest.raises(UserError, match="camera.views=4"):
        guidance.refine(rgb[:3], orbit_cameras(stage_cfg.camera, 3, 16, 16), 0)
