"""The run directory (threed/rundir.py) and resume across stages: a run continued from its checkpoints ends
exactly where an uninterrupted one does, at every stage, and a run folder of threed 0.1 resumes and re-exports.

The bit-for-bit tests interrupt a run with Ctrl-C (the real path: the trainer saves a checkpoint and exits 130)
at a chosen step of a chosen stage, resume it with `threed run --resume`, and compare the final checkpoint of
every stage with an uninterrupted run's: fields, occupancy grid, optimiser state, the step generator's state
and the trained guidance's state (ProlificDreamer's particle score and its optimiser), every tensor equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import trimesh
import yaml

from threed import methods
from threed.cli import main
from threed.rundir import RunDir, checkpoint_step
from threed.trainer import Trainer

DATA = Path(__file__).parent / "data"
# The smallest settings that still train every part: a 16² NeRF, a DMTet grid of 8 cells, 16² mesh renders.
TINY = ["render.width=16", "render.height=16", "render.num_samples=16", "render.occupancy_resolution=16",
        "render.occupancy_update_every=1", "field.n_levels=2", "field.max_resolution=32",
        "field.log2_hashmap_size=8", "field.hidden_dim=16", "export.resolution=12", "export.video=false",
        "export.preview_views=0", "export.texture=false", "log_every=1", "checkpoint_every=1000",
        "guidance.oracle.views=2"]
MESH = ["mesh.resolution=8", "mesh.width=16", "mesh.height=16"]
VSD = ["guidance.vsd.denoiser_channels=[8, 16]", "guidance.vsd.lora_samples=1"]
PD_STAGES = ["geometry.steps=2", "geometry.resolution=8", "geometry.width=16", "geometry.height=16",
             "texture.steps=3", "texture.width=16", "texture.height=16"]


# -- the layout ----------------------------------------------------------------------------------------

def test_checkpoints_are_per_stage_and_listed_by_step(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint("nerf") is None and run.latest_step("nerf") == 0 and not run.has_checkpoint()
    for step in (10, 9, 100):
        path = run.stage_dir("mesh") / f"step-{step:06d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (run.stage_dir("mesh") / "step-notanumber.pt").write_bytes(b"")
    assert [checkpoint_step(p) for p in run.checkpoints("mesh")] == [9, 10, 100]  # by number, not by name
    assert run.latest_step("mesh") == 100 and run.latest_step("nerf") == 0 and run.has_checkpoint()


def test_metrics_records_skip_broken_lines_and_split_stage_and_closing_records(tmp_path):
    run = RunDir(tmp_path)
    for record in ({"step": 1, "stage": "nerf", "loss": 1.0}, {"step": 2, "stage": "nerf", "stage_done": True},
                   {"step": 3, "stage": "mesh", "loss": 0.5}):
        run.append_metrics(record)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "los')  # a line cut short by a crash
    records, done = run.metrics()
    assert [r["step"] for r in records] == [1, 3] and done is None and run.closing_record() is None
    assert run.stage_records() == {"nerf": {"step": 2, "stage": "nerf", "stage_done": True}}
    assert run.last_logged_step() == 3
    run.append_metrics({"step": 3, "done": True, "wall_time_s": 1.0})
    assert run.closing_record()["wall_time_s"] == 1.0 and run.last_logged_step() == 3


def legacy_run(tmp_path: Path) -> Path:
    """A copy of a Magic3D run folder written by threed 0.1 (tests/data/run-0.1: 2 NeRF steps, 2 mesh-stage
    steps under the oracle prior, made with this file's TINY-like settings), its reference path pointed at the
    copy of the reference mesh beside it."""
    out = tmp_path / "run-0.1"
    shutil.copytree(DATA / "run-0.1", out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["guidance"]["oracle"]["reference"] = str(out / "reference.ply")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def test_a_0_1_run_folder_is_migrated_once_and_keeps_its_files_consistent(tmp_path):
    out = legacy_run(tmp_path)
    nerf_before = (out / "checkpoints" / "step-000002.pt").read_bytes()
    moved = RunDir(out).migrate()
    assert len(moved) == 3 and RunDir(out).migrate() == []  # idempotent
    assert (out / "checkpoints" / "nerf" / "step-000002.pt").read_bytes() == nerf_before
    assert [p.name for p in RunDir(out).checkpoints("mesh")] == ["step-000002.pt"]
    assert not (out / "checkpoints" / "fine").exists() and not list(out.glob("mesh-coarse.*"))
    assert "mtllib mesh-nerf.mtl" in (out / "mesh-nerf.obj").read_text()  # the OBJ still finds its material
    assert len(trimesh.load(out / "mesh-nerf.obj", force="mesh").faces) > 0
    entries = RunDir(out).mesh_entries()
    assert entries["mesh-nerf.obj"]["stage"] == "nerf" and not any(k.startswith("mesh-coarse") for k in entries)


def test_a_0_1_run_folder_reads_without_moving_anything(tmp_path):
    """Refining another run reads its checkpoints in place: a 0.1 folder's are found where 0.1 left them."""
    out = legacy_run(tmp_path)
    assert [p.name for p in RunDir(out).checkpoints("nerf")] == ["step-000002.pt"]
    assert RunDir(out).latest_step("mesh") == 2 and (out / "checkpoints" / "fine").is_dir()


def test_a_0_1_run_folder_re_exports_and_resumes(tmp_path, capsys):
    out = legacy_run(tmp_path)
    assert main(["export", str(out), "--format", "obj,glb"]) == 0
    assert "mesh.obj" in capsys.readouterr().out
    assert RunDir(out).mesh_entries()["mesh.obj"]["stage"] == "mesh"  # the mesh stage's surface
    assert main(["run", "--resume", str(out), "mesh.steps=3", "--quiet"]) == 0
    assert RunDir(out).latest_step("mesh") == 3 and RunDir(out).latest_step("nerf") == 2
    records, done = RunDir(out).metrics()
    assert done["step"] == 5 and records[-1] == {**records[-1], "stage": "mesh", "step": 5}


# -- resume, bit for bit -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference.ply"
    shutil.copy(DATA / "run-0.1" / "reference.ply", path)
    return path


def run_args(method: str, preset: str, reference: Path, out: Path, extra: list[str]) -> list[str]:
    return ["run", "--method", method, "--preset", preset, "--reference", str(reference), "--device", "cpu",
            "--steps", "3", "--out", str(out), "--quiet", *TINY, *extra]


def interrupted_at(monkeypatch, stage: str, step: int) -> None:
    """Ctrl-C as the trainer of `stage` is about to take step `step` + 1."""
    original = Trainer.train_step

    def train_step(self):
        if self.stage == stage and self.step == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


TIMES = ("train_time_s", "timed_steps")  # wall-clock bookkeeping, not training state


def assert_same(a, b, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in TIMES:
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def final_states(out: Path, stages: list[str]) -> dict:
    return {s: torch.load(RunDir(out).latest_checkpoint(s), weights_only=False) for s in stages}


@pytest.mark.parametrize("method, preset, extra, stop", [
    ("dreamfusion", "oracle", [], ("nerf", 2)),
    ("magic3d", "magic3d-oracle", ["mesh.steps=4", *MESH], ("nerf", 1)),
    ("magic3d", "magic3d-oracle", ["mesh.steps=4", *MESH], ("mesh", 2)),
    *[("prolificdreamer", "prolificdreamer-oracle", [*PD_STAGES, *VSD], stop)
      for stop in (("geometry", 0), ("texture", 0), ("texture", 2))],
], ids=["nerf", "magic3d-in-nerf-stage", "magic3d-in-mesh-stage", "prolificdreamer-at-geometry-start",
        "prolificdreamer-at-texture-start", "prolificdreamer-in-texture-stage"])
def test_resume_matches_an_uninterrupted_run_bit_for_bit(method, preset, extra, stop, reference, tmp_path,
                                                          monkeypatch):
    stages = [s.name for s in methods.get(method).stages]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(run_args(method, preset, reference, whole, extra)) == 0
    interrupted_at(monkeypatch, *stop)
    assert main(run_args(method, preset, reference, resumed, extra)) == 130
    assert RunDir(resumed).latest_step(stop[0]) == stop[1]
    monkeypatch.undo()
    assert main(["run", "--resume", str(resumed), "--quiet"]) == 0
    a, b = final_states(whole, stages), final_states(resumed, stages)
    assert_same(a, b)
    if method == "prolificdreamer":
        assert "optimizer" in a["texture"]["guidance"]  # the particle score is compared
    assert "occupancy" in json.dumps(list(a["nerf"]["renderer"]))  # so is the NeRF's occupancy grid
    assert a["nerf"]["optimizer"]["state"] and "generator" in a["nerf"]
