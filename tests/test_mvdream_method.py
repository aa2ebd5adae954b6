"""`threed run --method mvdream` end to end on a tiny random multi-view model (tests/tiny_models.py), its
resume, a bad checkpoint path, and Magic3D's mesh stage refining an MVDream run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from threed import spec
from threed.cli import main
from threed.config import build_config, save_config, validate
from threed.errors import UserError
from threed.stages import mesh_stage_config
from tiny_models import build_tiny_mvdream

TINY = ["render.width=16", "render.height=16", "render.batch_size=4", "render.hires_step=2", "render.hires_width=24",
        "render.hires_height=24", "render.hires_batch_size=4", "render.num_samples=16", "render.occupancy_resolution=16",
        "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12", "guidance.mvdream.resolution=16",
        "export.resolution=32", "export.video_frames=4", "export.video_resolution=32", "export.preview_views=2",
        "log_every=1", "checkpoint_every=2"]


def test_mvdream_run_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture):
    ckpt = build_tiny_mvdream(tmp_path / "model")
    out = tmp_path / "duck"
    code = main(["run", "--method", "mvdream", "--prompt", "a yellow rubber duck", "--model", str(ckpt),
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--quiet", *TINY])
    assert code == 0, capsys.readouterr().err
    for name in ["config.yaml", "metrics.jsonl", "mesh.obj", "mesh.glb", "preview.png"]:
        assert (out / name).is_file(), name
    code = main(["run", "--resume", str(out), "--steps", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and not r.get("done")]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] > 0 and 0 < r["t"] < 1 for r in steps)
    assert [p.name for p in sorted((out / "checkpoints" / "nerf").glob("*.pt"))][-1] == "step-000003.pt"


def test_bad_checkpoint_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    code = main(["run", "--method", "mvdream", "--prompt", "a duck", "--model", str(tmp_path / "nope.pt"),
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "nope.pt" in err and "does not exist" in err and "hf download MVDream/MVDream" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_magic3d_refine_takes_an_mvdream_run(tmp_path: Path):
    """The refinement keeps the run's field and prompt; its mesh stage draws single views at its own distances
    (camera.views and distance_relative are the NeRF stage's); the MVDream prior needs --guidance sd."""
    source = tmp_path / "mv"
    cfg = build_config("mvdream-oracle", ["guidance.oracle.reference=/refs/shape.ply",
                                          "guidance.multiview.recon_std_rescale=0.3"])
    save_config(cfg, source / "config.yaml")
    (source / "checkpoints").mkdir()
    (source / "checkpoints" / "step-000300.pt").write_bytes(b"")
    refined, _, checkpoint = spec.resolve_refine(spec.RunOptions(method="magic3d-refine", from_run=str(source)),
                                                 cuda=False)
    assert refined.method == "magic3d-refine" and refined.steps == 300 and checkpoint.name == "step-000300.pt"
    assert refined.guidance.multiview == type(refined.guidance.multiview)()
    stage = mesh_stage_config(refined, "mesh")
    assert stage.camera.views == 1 and not stage.camera.distance_relative
    validate(stage)
    real = tmp_path / "mv-real"
    save_config(build_config("mvdream"), real / "config.yaml")
    (real / "checkpoints").mkdir()
    (real / "checkpoints" / "step-010000.pt").write_bytes(b"")
    with pytest.raises(UserError, match="used the mvdream prior"):
        spec.resolve_refine(spec.RunOptions(method="magic3d-refine", from_run=str(real)), cuda=True)
    refined = spec.resolve_refine(spec.RunOptions(method="magic3d-refine", from_run=str(real), guidance="sd"),
                                  cuda=True)[0]
    assert refined.guidance.type == "stable_diffusion" and refined.guidance.mvdream == type(refined.guidance.mvdream)()
