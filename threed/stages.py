"""A method's stages, in one place: what each trains, with which settings, where its checkpoints go, how it
starts and how it resumes. `threed.pipeline.run` walks a method's stages in order.

- `nerf`: DreamFusion's hash-grid NeRF (threed/scenes/nerf.py), trained for `steps`; checkpoints in
  RUN/checkpoints/step-*.pt.
- `mesh`: Magic3D's fine stage (threed/scenes/mesh.py; Magic3D and ProlificDreamer), trained for
  `mesh.steps`, started from the NeRF stage's last checkpoint; checkpoints in RUN/checkpoints/fine/step-*.pt.

A stage is finished when its newest checkpoint holds its step count. Each stage sees the run's config through
`stage_config`: the mesh stage's cameras, render size, shading and t range come from the `mesh:` section.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from threed.config import Config
from threed.trainer import CHECKPOINT_RE, Trainer, checkpoints_in

STAGES = ("nerf", "mesh")


def checkpoint_dir(run_dir: Path, stage: str) -> Path:
    folder = Path(run_dir) / "checkpoints"
    return folder / "fine" if stage == "mesh" else folder


def stage_steps(cfg: Config, stage: str) -> int:
    return cfg.mesh.steps if stage == "mesh" else cfg.steps


def latest_step(run_dir: Path, stage: str) -> int:
    """The step of the stage's newest checkpoint (0: none), from its file name."""
    found = checkpoints_in(checkpoint_dir(run_dir, stage))
    return int(CHECKPOINT_RE.search(found[-1].name).group(1)) if found else 0  # type: ignore[union-attr]


def finished(run_dir: Path, cfg: Config, stage: str) -> bool:
    return started(run_dir, stage) and latest_step(run_dir, stage) >= stage_steps(cfg, stage)


def started(run_dir: Path, stage: str) -> bool:
    return bool(checkpoints_in(checkpoint_dir(run_dir, stage)))


def stage_config(cfg: Config, stage: str) -> Config:
    """The run's config as `stage` trains with it: the NeRF stage's is the run's own; the mesh stage's takes
    its steps, cameras (distance, fovy, elevation), render size, batch, shading and the prior's t range from
    `mesh:`, and everything else (prompt, prior, background, light, Adam's betas) from the run."""
    if stage == "nerf":
        return cfg
    out = copy.deepcopy(cfg)
    m = cfg.mesh
    out.steps = m.steps
    out.render.width, out.render.height, out.render.batch_size = m.width, m.height, m.batch_size
    out.render.hires_step = -1  # the mesh stage renders at its own size throughout
    out.render.shading, out.render.albedo_only_steps = m.shading, m.albedo_only_steps
    out.render.textureless_prob = m.textureless_prob
    out.camera.distance, out.camera.fovy, out.camera.elevation = m.distance, m.fovy, m.elevation
    out.guidance.t_min, out.guidance.t_max = m.t_min, m.t_max
    return out


def load_checkpoint(path: Path, device: str) -> dict:
    from threed.errors import UserError

    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): delete it to fall back to an older "
                        f"one") from None


def nerf_trainer(cfg: Config, device: str, guidance, run_dir: Path | None, resume: bool = False,
                 weights_only: bool = False) -> Trainer:
    """The NeRF stage's trainer, from its newest checkpoint when `resume`."""
    trainer = Trainer(cfg, device, guidance, run_dir=run_dir)
    if resume:
        found = checkpoints_in(checkpoint_dir(run_dir, "nerf"))  # type: ignore[arg-type]
        if found:
            trainer.load_state_dict(load_checkpoint(found[-1], device), weights_only=weights_only)
    return trainer


def mesh_trainer(cfg: Config, device: str, guidance, run_dir: Path, coarse: Trainer | None = None,
                 level: float | None = None, weights_only: bool = False, progress: bool = True) -> Trainer:
    """The mesh stage's trainer: from its newest checkpoint if it has one, else started from `coarse` (the
    NeRF stage's trainer) at density `level`. `cfg` is the run's config."""
    from threed.scenes.mesh import MeshScene

    stage_cfg = stage_config(cfg, "mesh")
    folder = checkpoint_dir(run_dir, "mesh")
    found = checkpoints_in(folder)
    torch.manual_seed(cfg.seed)
    if found:
        state = load_checkpoint(found[-1], device)
        scene = MeshScene.from_state(stage_cfg, state, device)
    else:
        assert coarse is not None and level is not None, "a new mesh stage starts from the NeRF stage"
        scene = MeshScene.from_coarse(stage_cfg, coarse.scene.field, coarse.scene.background, level, device,
                                      progress=progress)
        state = None
    trainer = Trainer(stage_cfg, device, guidance, run_dir=run_dir, scene=scene, checkpoint_dir=folder)
    if state is not None:
        trainer.load_state_dict(state, weights_only=weights_only)
    trainer.log_extra = {"stage": "mesh"}
    trainer.log_step_offset = cfg.steps
    trainer.diverged_hint = "lower mesh.lr_sdf or mesh.lr_texture and resume"
    return trainer


def planned_steps(cfg: Config) -> list[tuple[str, int]]:
    """(stage, its step count) for each stage of the run's method, in order: the run's whole budget."""
    from threed import methods

    return [(s, stage_steps(cfg, s)) for s in methods.get(cfg.method).stages]
