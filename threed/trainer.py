"""The one training loop: cameras -> field -> renderer -> guidance -> losses -> optimiser.

Every method (DreamFusion SDS, the oracle prior, CLIP guidance) runs through `Trainer`; a method only
chooses the guidance and the loss weights. Checkpoints are written atomically and the newest few kept;
Ctrl-C saves one; a non-finite loss stops the run before the optimiser can spoil the field.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from threed.cameras import sample_cameras
from threed.config import Config, to_dict
from threed.errors import UserError, first_line
from threed.fields.nerf import NeRFField
from threed.io import append_jsonl, atomic_torch_save
from threed.render.background import Background
from threed.render.shading import pick_shading
from threed.render.volume import VolumeRenderer

Guidance = Callable[..., dict]
CHECKPOINT_RE = re.compile(r"step-(\d+)\.pt$")


class Interrupted(UserError):
    """Ctrl-C during training: a checkpoint was saved; exit code 130."""

    exit_code = 130


class Diverged(UserError):
    """The loss became NaN or infinite."""


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    paths = [p for p in (Path(run_dir) / "checkpoints").glob("step-*.pt") if CHECKPOINT_RE.search(p.name)]
    return sorted(paths, key=lambda p: int(CHECKPOINT_RE.search(p.name).group(1)))  # type: ignore[union-attr]


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
    def __init__(self, cfg: Config, device: str, guidance: Guidance | None, run_dir: Path | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        torch.manual_seed(cfg.seed)  # the field's initial parameters
        self.field = NeRFField(cfg.field, cfg.render.bound, self.device)
        self.background = Background(cfg.render).to(self.device)
        self.renderer = VolumeRenderer(cfg.render, self.device)
        self.guidance = guidance
        groups = [{"params": list(self.field.parameters()), "lr": cfg.optim.lr(0)}]
        self.lr_schedules = [cfg.optim.lr]
        bg_params = list(self.background.parameters())
        if bg_params:
            groups.append({"params": bg_params, "lr": cfg.optim.lr_background(0)})
            self.lr_schedules.append(cfg.optim.lr_background)
        self.optimizer = torch.optim.Adam(groups, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                          weight_decay=cfg.optim.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.train_time_s = 0.0  # summed over every segment of a resumed run ...
        self.timed_steps = 0  # ... and the steps it covers (a 0.1 checkpoint carries no time)
        self.timings: dict[str, float] = {}
        # Wait for the GPU after each phase, so that `timings` split the step (benchmarks); off, a step waits
        # for the device once, for the finiteness check, and the host queues ahead of the GPU otherwise.
        self.phase_timing = False

    def describe(self) -> str:
        """Which backends were chosen, and why a CUDA run is not using an accelerator."""
        field, renderer = self.field.backend, self.renderer.backend
        if self.device.type == "cuda":
            if field == "triton" and self.cfg.field.backend == "auto":
                field += " (tinycudann not importable)"
            if field == "torch" and self.cfg.field.backend == "auto":
                field += " (tinycudann and triton not importable)"
            if renderer == "torch" and self.cfg.render.backend == "auto":
                renderer += " (nerfacc not importable)"
        if field.startswith("triton") and self.cfg.field.normals == "analytic":
            field += " (analytic normals: PyTorch path, the kernels have no d/dx)"
        return f"field backend: {field} | renderer: {renderer} | device: {self.device}"

    # -- losses -------------------------------------------------------------------------------
    def uses(self, loss: str) -> bool:
        """Whether a loss's weight schedule is ever non-zero (a loss that is never weighted is not computed)."""
        return getattr(self.cfg.loss, loss).bounds()[1] > 0

    def regularisers(self, opacity: Tensor, orient: Tensor) -> dict[str, Tensor]:
        lc = self.cfg.loss
        out: dict[str, Tensor] = {}
        if self.uses("opacity"):
            out["opacity"] = opacity.mean()
        if self.uses("transmittance"):
            out["transmittance"] = -torch.clamp((1.0 - opacity).mean(), max=lc.transmittance_target(self.step))
        if self.uses("orient"):
            out["orient"] = orient
        if self.uses("entropy"):
            a = opacity.clamp(1e-5, 1 - 1e-5)
            out["entropy"] = -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()
        return out

    # -- one iteration ------------------------------------------------------------------------
    def train_step(self) -> Record:
        """Render a batch of random views, score it with the guidance, take one Adam step.

        Returns the step's losses and the guidance's statistics as computed, tensors still on the device
        (`as_floats` reads them): converting them here would wait for the GPU at every step.
        """
        assert self.guidance is not None, "a Trainer without guidance can only render"
        cfg, dev = self.cfg, self.device
        sync = _sync if self.phase_timing else _no_sync
        self.field.train()
        self.background.train()
        t0 = time.perf_counter()
        self.renderer.update_occupancy(self.field, self.step, self.generator)
        cams = sample_cameras(cfg.camera, cfg.render.batch_size, cfg.render.width, cfg.render.height,
                              self.generator, cfg.render.light_distance).to(dev)
        shading = pick_shading(cfg.render.shading, self.step, cfg.render.albedo_only_steps,
                               cfg.render.textureless_prob, self.generator)
        out = self.renderer(self.field, self.background, cams, shading, need_normals=self.uses("orient"),
                            generator=self.generator)
        sync(dev)
        t1 = time.perf_counter()
        g = self.guidance(out.rgb, cams, self.step, shading=shading, background=out.background.detach(),
                          opacity=out.opacity)
        losses = {"guidance": g["loss"], **self.regularisers(out.opacity, out.orient)}
        total = sum(getattr(cfg.loss, name)(self.step) * value for name, value in losses.items())
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
            "field": self.field.state_dict(),
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "train_time_s": self.train_time_s,
            "timed_steps": self.timed_steps,
            "config": to_dict(self.cfg),
        }
        state["renderer"] = self.renderer.state_dict()  # occupancy grid (either backend)
        return state

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        try:
            self.field.load_state_dict(state["field"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint does not match this field configuration ({first_line(e)})") from None
        self.background.load_state_dict(state["background"])
        self.step = int(state["step"])
        try:
            self.renderer.load_state_dict(state.get("renderer", {}))
        except RuntimeError:  # saved by the other renderer backend: rebuild the grid from the field
            self.renderer.rebuild_occupancy(self.field)
        if weights_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))

    def save_checkpoint(self) -> Path:
        assert self.run_dir is not None
        path = self.run_dir / "checkpoints" / f"step-{self.step:06d}.pt"
        atomic_torch_save(self.state_dict(), path)
        for old in list_checkpoints(self.run_dir)[:-max(self.cfg.keep_checkpoints, 1)]:
            old.unlink(missing_ok=True)
        return path

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, steps: int, progress: bool = True) -> dict[str, float]:
        """Train until `self.step == steps`, logging to metrics.jsonl and checkpointing. Returns speed stats:
        this segment's time and steps, and the run's total training time over all segments."""
        from tqdm import tqdm

        assert self.run_dir is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        metrics = self.run_dir / "metrics.jsonl"
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
                    append_jsonl(metrics, {"step": self.step, **values, "time_s": round(time.perf_counter() - start, 3)})
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
            kept = list_checkpoints(self.run_dir)
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint had been written yet"
            raise Diverged(f"{e}; {where}; lower optim.lr or guidance.sd.guidance_scale and resume") from None
        bar.close()
        if self.step != last_saved or not list_checkpoints(self.run_dir):
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
