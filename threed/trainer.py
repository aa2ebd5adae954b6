"""The one training loop: cameras -> scene (field + renderer) -> guidance -> losses -> optimiser.

Every method (DreamFusion SDS, ProlificDreamer VSD, the oracle prior, CLIP guidance) and every stage of one
(a NeRF, then a mesh) runs through `Trainer`; a method chooses the guidance and the loss weights, a stage
its scene (threed/scenes/: what is optimised and how it is rendered). Checkpoints are written atomically
and the newest few kept (with a guidance's own trained state: VSD's LoRA); Ctrl-C saves one; a non-finite
loss stops the run before the optimiser can spoil the scene.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from threed.cameras import sample_cameras
from threed.config import Config, to_dict
from threed.errors import Diverged, UserError
from threed.io import atomic_torch_save
from threed.rundir import RunDir, checkpoint_name, checkpoints_in
from threed.schedule import render_batch
from threed.scenes import Scene, weight_used
from threed.scenes.nerf import NeRFScene

Guidance = Callable[..., dict]
# optim.optimizer -> its class; every group gets the run's betas, eps and weight decay
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class Interrupted(UserError):
    """Ctrl-C during training: a checkpoint was saved; exit code 130."""

    exit_code = 130


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_sync(device: torch.device) -> None:
    pass


Record = dict[str, "Tensor | float"]


def as_floats(record: Record) -> dict[str, float]:
    """A step's record as plain numbers: every tensor read back in one transfer per device (on a GPU each
    read waits for the queued work, so the loop does this only on the steps it logs)."""
    out = {k: float(v) for k, v in record.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in record.items():
        if isinstance(value, Tensor):
            by_device.setdefault(value.device, []).append(key)
    for keys in by_device.values():
        values = torch.stack([record[k].detach().reshape(()).double() for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in record}


class Trainer:
    """Trains `scene` (default: a new NeRFScene of `cfg`) under `guidance` as the run's stage `stage`. `cfg`
    is the config as the stage sees it (threed/stages.py: cameras, render size, t range); checkpoints go to
    the stage's folder of `run_dir` (threed/rundir.py) and per-step records, tagged with the stage, to its
    metrics.jsonl, the step shifted by `log_step_offset` (a later stage continues the run's step axis)."""

    def __init__(self, cfg: Config, device: str, guidance: Guidance | None, run_dir: Path | None = None,
                 scene: Scene | None = None, stage: str = "nerf"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.stage = stage
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.checkpoint_dir = self.run.stage_dir(stage) if self.run is not None else None
        if scene is None:
            torch.manual_seed(cfg.seed)  # the field's initial parameters
            scene = NeRFScene(cfg, self.device)
        self.scene = scene
        self.guidance = guidance
        groups, self.lr_schedules = [], []
        for params, schedule in scene.param_groups():
            groups.append({"params": params, "lr": schedule(0)})
            self.lr_schedules.append(schedule)
        self.optimizer = OPTIMIZERS[cfg.optim.optimizer](groups, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                                         weight_decay=cfg.optim.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.train_time_s = 0.0  # summed over every segment of a resumed run ...
        self.timed_steps = 0  # ... and the steps it covers (a 0.1 checkpoint carries no time)
        self.timings: dict[str, float] = {}
        # Wait for the GPU after each phase, so that `timings` split the step (benchmarks); off, a step waits
        # for the device once, for the finiteness check, and the host queues ahead of the GPU otherwise.
        self.phase_timing = False
        self.log_step_offset = 0
        self.diverged_hint = "lower optim.lr or guidance.sd.guidance_scale and resume"

    # The NeRF scene's parts, as before scenes existed (export, evaluation and benchmarks use them).
    @property
    def field(self):
        return self.scene.field

    @property
    def renderer(self):
        return self.scene.renderer

    @property
    def background(self):
        return self.scene.background

    def describe(self) -> str:
        """Which backends were chosen, and why a CUDA run is not using an accelerator."""
        return f"{self.scene.describe()} | device: {self.device}"

    # -- losses -------------------------------------------------------------------------------
    def uses(self, loss: str) -> bool:
        """Whether a loss's weight schedule is ever non-zero (a loss that is never weighted is not computed)."""
        return weight_used(self.scene.losses, loss)

    # -- one iteration ------------------------------------------------------------------------
    def train_step(self) -> Record:
        """Render a batch of random views, score it with the guidance, take one optimiser step.

        Returns the step's losses and the guidance's statistics as computed, tensors still on the device
        (`as_floats` reads them): converting them here would wait for the GPU at every step.
        """
        assert self.guidance is not None, "a Trainer without guidance can only render"
        cfg, dev = self.cfg, self.device
        sync = _sync if self.phase_timing else _no_sync
        self.scene.train()
        t0 = time.perf_counter()
        self.scene.prepare(self.step, self.generator)
        width, height = getattr(self.scene, "render_size", cfg.render.size)(self.step)  # a scene may choose
        cams = sample_cameras(cfg.camera, render_batch(cfg.render, self.step), width, height, self.generator,
                              cfg.render).to(dev)
        shading = self.scene.pick_shading(self.step, self.generator)
        out = self.scene.render(cams, shading, need_normals=self.uses("orient"), generator=self.generator)
        sync(dev)
        t1 = time.perf_counter()
        g = self.guidance(out.rgb, cams, self.step, shading=shading, background=out.background.detach(),
                          opacity=out.opacity)
        losses = {"guidance": g["loss"], **self.scene.regularisers(out, self.step)}
        weights = self.scene.losses
        total = sum(getattr(weights, name)(self.step) * value for name, value in losses.items())
        sync(dev)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        # Checked once the backward is queued: the host waits for the device here, once per step, while the
        # GPU works through the guidance and the backward. The optimiser never steps on a non-finite loss.
        if not torch.isfinite(total):
            raise Diverged(f"the loss became {total.item()} at step {self.step}")
        sync(dev)
        t3 = time.perf_counter()
        for group, schedule in zip(self.optimizer.param_groups, self.lr_schedules):
            group["lr"] = schedule(self.step)
        self.optimizer.step()
        after_step = getattr(self.scene, "after_step", None)
        if after_step is not None:  # a scene that reshapes itself as it trains (Gaussians densify)
            after_step(self.step + 1, self.optimizer, self.generator)
        sync(dev)
        t4 = time.perf_counter()
        self.timings = {"render": t1 - t0, "guidance": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}
        self.step += 1
        record: Record = {"loss": total.detach()}
        record.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        record.update({k: v.detach() if isinstance(v, Tensor) else float(v) for k, v in g.items()
                       if k != "loss" and (isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1))})
        return record

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            **self.scene.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "train_time_s": self.train_time_s,
            "timed_steps": self.timed_steps,
            "config": to_dict(self.cfg),
        }
        if hasattr(self.guidance, "state_dict"):  # a guidance that trains too (VSD's LoRA, its optimiser, RNG)
            state["guidance"] = self.guidance.state_dict()
        return state

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        self.scene.load_state_dict(state)
        self.step = int(state["step"])
        set_step = getattr(self.scene, "set_step", None)
        if set_step is not None:  # the scene as its last trained step left it (an export reads it so)
            set_step(max(self.step - 1, 0))
        if weights_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if "guidance" in state and hasattr(self.guidance, "load_state_dict"):
            self.guidance.load_state_dict(state["guidance"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))

    @property
    def run_dir(self) -> Path | None:
        return self.run.path if self.run is not None else None

    def save_checkpoint(self) -> Path:
        assert self.checkpoint_dir is not None
        path = self.checkpoint_dir / checkpoint_name(self.step)
        atomic_torch_save(self.state_dict(), path)
        for old in checkpoints_in(self.checkpoint_dir)[:-max(self.cfg.keep_checkpoints, 1)]:
            old.unlink(missing_ok=True)
        return path

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, steps: int, progress: bool = True) -> dict[str, float]:
        """Train until `self.step == steps`, logging to metrics.jsonl and checkpointing. Returns speed stats:
        this segment's time and steps, and the run's total training time over all segments."""
        from tqdm import tqdm

        assert self.run is not None
        self.run.path.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        start_step, start = self.step, time.perf_counter()
        bar = tqdm(total=steps, initial=self.step, disable=not progress, dynamic_ncols=True, unit="it")
        last_saved, tick = self.step, start
        try:
            while self.step < steps:
                record = self.train_step()
                now = time.perf_counter()
                self.train_time_s += now - tick
                self.timed_steps += 1
                tick = now
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == steps:
                    values = as_floats(record)
                    bar.set_postfix(loss=f"{values['loss']:.4g}")
                    self.run.append_metrics({"step": self.step + self.log_step_offset, "stage": self.stage,
                                             **values, "time_s": round(time.perf_counter() - start, 3)})
                if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint()
            raise Interrupted(f"interrupted at step {self.step}; checkpoint saved to {path}; continue with "
                              f"`threed run --resume {self.run_dir}`") from None
        except Diverged as e:
            bar.close()
            kept = checkpoints_in(self.checkpoint_dir)
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
            raise Diverged(f"{e}; {where}; {self.diverged_hint}") from None
        bar.close()
        if self.step != last_saved or not checkpoints_in(self.checkpoint_dir):
            self.save_checkpoint()
        elapsed = time.perf_counter() - start
        total = self.train_time_s
        return {"segment_time_s": elapsed, "segment_steps": self.step - start_step, "train_time_s": total,
                "it_per_s": self.timed_steps / total if total > 0 else 0.0}


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size. On Linux that is
    VmHWM: getrusage's ru_maxrss also counts the memory of the process that started this one (it survives
    fork and exec), so a run started by a large process (the bench) would report that process's size."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, kB elsewhere
