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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    def describe(self) -> str:
        """Which backends were chosen, and why a CUDA run is not using an accelerator."""
        field, renderer = self.field.backend, self.renderer.backend
        if self.device.type == "cuda":
            if field == "torch" and self.cfg.field.backend == "auto":
                field += " (tinycudann not importable)"
            if renderer == "torch" and self.cfg.render.backend == "auto":
                renderer += " (nerfacc not importable)"
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
        if self.uses("sparsity"):
            out["sparsity"] = (opacity ** 2 + 0.01).sqrt().mean()
        if self.uses("transmittance"):
            out["transmittance"] = -torch.clamp((1.0 - opacity).mean(), max=lc.transmittance_target(self.step))
        if self.uses("orient"):
            out["orient"] = orient
        if self.uses("entropy"):
            a = opacity.clamp(1e-5, 1 - 1e-5)
            out["entropy"] = -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()
        return out

    # -- one iteration ------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Render a batch of random views, score it with the guidance, take one Adam step."""
        assert self.guidance is not None, "a Trainer without guidance can only render"
        cfg, dev = self.cfg, self.device
        self.field.train()
        self.background.train()
        t0 = time.perf_counter()
        self.renderer.update_occupancy(self.field, self.step, self.generator)
        width, height = cfg.render.size(self.step)
        cams = sample_cameras(cfg.camera, cfg.render.batch_size, width, height, self.generator,
                              cfg.render.light_distance).to(dev)
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
        if not torch.isfinite(total):
            raise Diverged(f"the loss became {total.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        sync(dev)
        t3 = time.perf_counter()
        for group, schedule in zip(self.optimizer.param_groups, self.lr_schedules):
            group["lr"] = schedule(self.step)
        self.optimizer.step()
        sync(dev)
        t4 = time.perf_counter()
        self.timings = {"render": t1 - t0, "guidance": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}
        self.step += 1
        record: dict[str, float] = {"loss": float(total.detach())}
        record.update({f"loss_{k}": float(v.detach()) for k, v in losses.items()})
        record.update({k: float(v) for k, v in g.items() if k != "loss" and isinstance(v, (int, float))})
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
        if hasattr(self.guidance, "state_dict"):  # a guidance that trains too (VSD's LoRA, its optimiser, RNG)
            state["guidance"] = self.guidance.state_dict()
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
        if "guidance" in state and hasattr(self.guidance, "load_state_dict"):
            self.guidance.load_state_dict(state["guidance"])
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
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                if self.step % cfg.log_every == 0 or self.step == steps:
                    append_jsonl(metrics, {"step": self.step, **record, "time_s": round(time.perf_counter() - start, 3)})
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
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
