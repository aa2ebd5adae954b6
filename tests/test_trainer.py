"""The training loop's contract: losses go down under a simple guidance, checkpoints resume bit-for-bit,
Ctrl-C saves a checkpoint, a NaN stops the run naming the step and keeps the last good checkpoint."""

import json

import pytest
import torch

from threed.config import build_config
from threed.rundir import RunDir
from threed.trainer import Diverged, Interrupted, Trainer, as_floats

SMALL = ["render.width=16", "render.height=16", "render.num_samples=24", "field.n_levels=4",
         "field.max_resolution=64", "field.log2_hashmap_size=12", "render.occupancy_resolution=16",
         "log_every=1", "checkpoint_every=2", "render.shading=albedo", "render.background=solid"]


class GreyTarget:
    """A stand-in prior: L2 pull of every pixel toward grey; optionally misbehaves at a given step."""

    def __init__(self, nan_at: int | None = None, interrupt_at: int | None = None):
        self.nan_at, self.interrupt_at = nan_at, interrupt_at

    def __call__(self, rgb, cameras, step, shading, background, **_):
        if step == self.interrupt_at:
            raise KeyboardInterrupt
        loss = ((rgb - 0.5) ** 2).sum()
        if step == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "t": 0.5}


def make(tmp_path, guidance, extra=()):
    cfg = build_config("cpu-tiny", SMALL + list(extra))
    return Trainer(cfg, "cpu", guidance, run_dir=tmp_path)


def test_fit_logs_and_checkpoints(tmp_path):
    trainer = make(tmp_path, GreyTarget(), ["keep_checkpoints=2"])
    trainer.fit(5, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all("loss" in r and "loss_guidance" in r and "t" in r for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert [p.name for p in RunDir(tmp_path).checkpoints("nerf")] == ["step-000004.pt", "step-000005.pt"]


def test_resume_continues_exactly(tmp_path):
    straight = make(tmp_path / "a", GreyTarget())
    straight.fit(4, progress=False)
    first = make(tmp_path / "b", GreyTarget())
    first.fit(2, progress=False)
    second = make(tmp_path / "b", GreyTarget())
    second.load_state_dict(torch.load(RunDir(tmp_path / "b").checkpoints("nerf")[-1], weights_only=False))
    assert second.step == 2
    second.fit(4, progress=False)
    for p, q in zip(straight.field.parameters(), second.field.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    trainer = make(tmp_path, GreyTarget(interrupt_at=3))
    with pytest.raises(Interrupted) as e:
        trainer.fit(10, progress=False)
    assert e.value.exit_code == 130
    assert "--resume" in str(e.value)
    assert RunDir(tmp_path).checkpoints("nerf")[-1].name == "step-000003.pt"


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make(tmp_path, GreyTarget(nan_at=3))
    with pytest.raises(Diverged) as e:
        trainer.fit(10, progress=False)
    message = str(e.value)
    assert "step 3" in message and "step-000002.pt" in message and "\n" not in message
    assert [p.name for p in RunDir(tmp_path).checkpoints("nerf")] == ["step-000002.pt"]
    state = torch.load(RunDir(tmp_path).checkpoints("nerf")[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["field"].values())


def test_a_step_returns_device_values_read_only_when_logged(tmp_path):
    """train_step hands back tensors (reading one on a GPU waits for all queued work); as_floats turns a
    record into the numbers float() of each value gives, in its order, and those are what metrics.jsonl
    holds on the steps it logs."""
    trainer = make(tmp_path, GreyTarget(), ["log_every=2"])
    record = trainer.train_step()
    assert isinstance(record["loss"], torch.Tensor) and isinstance(record["loss_guidance"], torch.Tensor)
    assert record["t"] == 0.5
    values = as_floats(record)
    assert list(values) == list(record) and values == {k: float(v) for k, v in record.items()}
    trainer.fit(5, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 5]
    assert all(isinstance(r["loss"], float) and r["t"] == 0.5 for r in logged)


def test_per_part_learning_rates_land_in_the_optimisers_groups(tmp_path):
    """ProlificDreamer's optimiser (threestudio's): AdamW with weight decay 0.01, the hash grid at 0.01, the MLP
    at 0.001, the background at 0.001, each rate a schedule of its own; elsewhere Adam, the field one group."""
    small = ["render.width=16", "render.height=16", "render.num_samples=24", "field.n_levels=4",
             "field.max_resolution=64", "field.log2_hashmap_size=12", "render.occupancy_resolution=16",
             "render.shading=albedo", "checkpoint_every=0"]
    cfg = build_config("prolificdreamer-cpu", small + ["optim.lr_mlp=[0, 0.001, 0.0005, 10]"])
    trainer = Trainer(cfg, "cpu", GreyTarget(), run_dir=tmp_path)
    field, opt = trainer.field, trainer.optimizer
    assert type(opt) is torch.optim.AdamW
    ids = lambda params: [id(p) for p in params]  # noqa: E731
    assert [ids(g["params"]) for g in opt.param_groups] == [
        ids(field.encoding.parameters()), ids(field.mlp.parameters()), ids(trainer.background.parameters())]
    assert len(ids(field.encoding.parameters())) + len(ids(field.mlp.parameters())) == len(ids(field.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.001, 0.001]
    assert all(g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.99) and g["eps"] == 1e-15
               for g in opt.param_groups)
    for _ in range(6):  # the last step is step 5: the MLP's rate is halfway down its ramp
        trainer.train_step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.00075, 0.001])
    plain = Trainer(build_config("cpu-tiny", small), "cpu", GreyTarget(), run_dir=tmp_path / "plain")
    assert type(plain.optimizer) is torch.optim.Adam and len(plain.optimizer.param_groups) == 2  # field, background
    assert plain.optimizer.param_groups[0]["weight_decay"] == 0.0
