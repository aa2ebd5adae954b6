"""A method's stages, as data: what each trains, with which settings, how it starts from the stage before it.

A method (threed/methods/) declares an ordered tuple of stages; threed/pipeline.py runs any such tuple with one
loop. A stage's name is the one word for it everywhere: its checkpoint folder (RUN/checkpoints/<name>/), the
`stage` of its metrics.jsonl records, and the mesh it leaves behind when a later stage follows
(mesh-<name>.<fmt>; the last stage's is mesh.<fmt>).

- `nerf`: DreamFusion's hash-grid NeRF (threed/scenes/nerf.py), trained for `steps`, from a fresh field;
  image-to-3D's (IMAGE_NERF, threed/scenes/reference.py) adds the input image's reference-view losses.
- `mesh`: Magic3D's mesh stage (threed/scenes/mesh.py), trained for `mesh.steps`, started from the NeRF
  stage's field at the level of its kept mesh (mesh-nerf.*): surface and texture together, under the method's
  guidance; image-to-3D's (IMAGE_MESH) keeps the reference view's RGB and mask losses.
- `geometry`: ProlificDreamer's stage 2: the same start, the surface shaped from normal maps (`geometry.shading:
  normal`) under the prior's SDS alone (not the method's VSD), `geometry.steps`.
- `gaussians`: DreamGaussian's 3D Gaussians (threed/scenes/gaussians.py), trained for `steps` from a ball,
  densified and pruned as they train (settings: `gaussians:`); image-to-3D's (IMAGE_GAUSSIANS,
  threed/scenes/reference.py) adds the input image's reference-view losses.
- `texture` after `gaussians`: DreamGaussian's texture refinement, `texture.steps`: the surface of the
  Gaussians' opacity field at the level of their kept mesh (mesh-gaussians.*), kept (the texture section's
  geometry learning rates are 0), a texture field fitted to the Gaussians' colours, then trained toward the
  prior's SDEdit edits of its renders (gaussians.texture_objective, threed/guidance/sdedit.py) or its SDS;
  image-to-3D's (IMAGE_GAUSSIAN_TEXTURE) also pulls it toward the input image (texture.loss.reference).
- `texture`: ProlificDreamer's stage 3: the geometry stage's surface, kept (its geometry learning rates are 0),
  its texture trained under the method's guidance (VSD, with a particle score of its own), `texture.steps`.

Fantasia3D's two stages (threed/methods/fantasia3d.py) share the names and scene:
- `geometry` (FANTASIA3D_GEOMETRY): the `geometry:` section's surface started from `geometry.init` (a sphere or
  a guide mesh) rather than a NeRF, shaped from normal maps under the prior (the first `geometry.latent_steps`
  scoring the 64² normal-and-mask image as the latent);
- `appearance`: that surface kept, a material field trained under split-sum image-based lighting
  (`appearance:`, `shading: pbr`), `appearance.steps`.

A stage is finished when its newest checkpoint holds its step count. Each stage sees the run's config through
`Stage.config`: a mesh-shaped stage's section (`mesh:`, `geometry:`, `texture:`, threed/config.py MeshConfig)
gives its cameras, render size, shading, t range and classifier-free guidance, and the scene reads it as
`cfg.mesh`. Every stage exports through its scene's `export_mesh` (threed/export.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from threed.config import Config
from threed.errors import UserError
from threed.render.background import Background
from threed.rundir import RunDir, load_checkpoint
from threed.scenes import Scene
from threed.scenes.gaussians import GaussianScene, texture_scene
from threed.scenes.mesh import MeshScene, texture_field
from threed.scenes.nerf import NeRFScene
from threed.scenes.reference import (ReferenceViewGaussianScene, ReferenceViewMeshScene, ReferenceViewNeRFScene,
                                     ReferenceViewTextureScene)
from threed.trainer import Guidance, Trainer

# (the stage's config, the previous stage's trainer, mesh.json's entry of its kept mesh, device, progress)
StartFn = Callable[[Config, Trainer, dict, str, bool], Scene]


@dataclass(frozen=True)
class Stage:
    """One stage of a method. `section` names the config section holding its settings and `steps` (empty:
    the run's top level, `steps`); `scene` is the Scene class it trains, restored by `scene.from_state`;
    `start` builds its scene from the previous stage's result (None: a fresh scene, `scene(cfg, device)`);
    `configure` gives the run's config as the stage sees it, from the run's and the section's name (None:
    the run's own); `guidance` is "method" for the method's guidance (ProlificDreamer's VSD) or "prior" for
    the run's prior alone (its SDS); `reads` names config sections that only this stage reads (a setting there
    is an error for a method without the stage)."""

    name: str
    scene: Any
    section: str = ""
    start: StartFn | None = None
    configure: Callable[[Config, str], Config] | None = None
    guidance: Literal["method", "prior"] = "method"
    reads: tuple[str, ...] = ()  # config sections only this stage reads, besides `section` (gaussians)
    # the stage's objective around the guidance built for it (None: the guidance's own; DreamGaussian's texture
    # stage: its SDEdit refinement, `texture_objective`)
    objective: Callable[[Any, Config], Any] | None = None
    diverged_hint: str = "lower optim.lr or guidance.sd.guidance_scale and resume"

    @property
    def steps_key(self) -> str:
        """The config key of its step count."""
        return f"{self.section}.steps" if self.section else "steps"

    def steps(self, cfg: Config) -> int:
        return int(getattr(cfg, self.section).steps if self.section else cfg.steps)

    def config(self, cfg: Config) -> Config:
        return self.configure(cfg, self.section) if self.configure is not None else cfg

    def finished(self, run: RunDir, cfg: Config) -> bool:
        return run.latest_checkpoint(self.name) is not None and run.latest_step(self.name) >= self.steps(cfg)

    def trainer(self, cfg: Config, device: str, guidance: Guidance | None, run: RunDir, offset: int = 0,
                previous: Trainer | None = None, kept: dict | None = None, progress: bool = True,
                weights_only: bool = False) -> Trainer:
        """The stage's trainer on `cfg` (the run's config): from its newest checkpoint if it has one, else
        started from `previous` (the stage before's trainer) and `kept` (mesh.json's entry of its kept mesh)
        where the stage has a `start`, else fresh. `offset`: the run's steps before this stage."""
        stage_cfg = self.config(cfg)
        latest = run.latest_checkpoint(self.name)
        state = load_checkpoint(latest, device) if latest is not None else None
        torch.manual_seed(cfg.seed)  # a new scene's initial parameters
        if state is not None:
            scene = self.scene.from_state(stage_cfg, state, device)
        elif self.start is not None:
            assert previous is not None and kept is not None, f"the {self.name} stage starts from the stage before"
            scene = self.start(stage_cfg, previous, kept, device, progress)
        else:
            scene = self.scene(stage_cfg, device)
        trainer = Trainer(stage_cfg, device, guidance, run_dir=run.path, scene=scene, stage=self.name)
        if state is not None:
            trainer.load_state_dict(state, weights_only=weights_only)
        trainer.log_step_offset = offset
        trainer.diverged_hint = self.diverged_hint
        return trainer


def mesh_stage_config(cfg: Config, section: str) -> Config:
    """The run's config as a mesh-shaped stage trains with it: its section (MeshConfig) becomes `mesh`, which
    the scene reads; its steps, cameras (distance, fovy, elevation, the view prompts' front and back cones),
    render size, batch, shading, the prior's t range, classifier-free guidance and a background kind of its own
    come from there, and everything else (prompt, prior, background, light, Adam's betas) from the run."""
    out = copy.deepcopy(cfg)
    m = copy.deepcopy(getattr(cfg, section))
    out.mesh = m
    out.steps = m.steps
    out.render.width, out.render.height, out.render.batch_size = m.width, m.height, m.batch_size
    out.render.hires_step, out.render.progressive = -1, ()  # a mesh stage renders at its own size throughout
    out.render.shading, out.render.albedo_only_steps = m.shading, m.albedo_only_steps
    out.render.textureless_prob = m.textureless_prob
    if m.background:  # a background kind of the stage's own
        out.render.background = m.background
    out.camera.distance, out.camera.fovy, out.camera.elevation = m.distance, m.fovy, m.elevation
    # the section's views per object (1; MVDream's groups of 4 for DreamGaussian's MVDream texture stage) at
    # the section's distances (MVDream's NeRF stage scales its distances by the field of view)
    out.camera.views, out.camera.distance_relative = m.views, False
    out.guidance.t_min, out.guidance.t_max = m.t_min, m.t_max
    if m.guidance_scale >= 0:
        out.guidance.sd.guidance_scale = m.guidance_scale
    if m.front_threshold >= 0:
        out.camera.front_threshold = m.front_threshold
    if m.back_threshold >= 0:
        out.camera.back_threshold = m.back_threshold
    if getattr(m, "weighting", ""):  # a stage with an SDS weighting of its own (Fantasia3D's appearance)
        out.guidance.weighting = m.weighting
    return out


def mesh_from_nerf(cfg: Config, previous: Trainer, kept: dict, device: str, progress: bool) -> MeshScene:
    """A mesh stage's start from the NeRF: the surface at the level its kept mesh was extracted at, the texture
    and background copies of the NeRF's (or new: mesh.fresh_texture, mesh.fresh_background)."""
    scene = MeshScene.from_coarse(cfg, previous.scene.field, previous.scene.background, float(kept["threshold"]),
                                  device, progress=progress)
    return renew_appearance(scene)


def image_mesh_from_nerf(cfg: Config, previous: Trainer, kept: dict, device: str, progress: bool) -> MeshScene:
    """Image-to-3D's mesh stage's start: as `mesh_from_nerf`, in the scene that keeps the reference view's losses."""
    scene = ReferenceViewMeshScene.from_coarse(cfg, previous.scene.field, previous.scene.background,
                                               float(kept["threshold"]), device, progress=progress)
    return renew_appearance(scene)


def mesh_from_mesh(cfg: Config, previous: Trainer, kept: dict, device: str, progress: bool) -> MeshScene:
    """A mesh stage's start from the mesh stage before it: its surface, texture field and background as they
    ended (a copy: the earlier stage's checkpoints keep theirs; or new: mesh.fresh_texture, fresh_background)."""
    return renew_appearance(MeshScene.from_state(cfg, copy.deepcopy(previous.scene.state_dict()), device))


def renew_appearance(scene: MeshScene) -> MeshScene:
    """The texture field and background freshly initialised where the stage asks for it (its config's
    mesh.fresh_texture / fresh_background), the surface kept."""
    cfg = scene.cfg
    if cfg.mesh.fresh_texture:  # of the stage's kind: a material where it shades physically based
        scene.texture = texture_field(cfg, scene.device)
    if cfg.mesh.fresh_background:
        scene.background = Background(cfg.render).to(scene.device)
        scene.background.random_aug = cfg.mesh.random_aug
    return scene


def material_from_geometry(cfg: Config, previous: Trainer, kept: dict, device: str, progress: bool) -> MeshScene:
    """Fantasia3D's appearance start: the geometry stage's surface as it ended (a copy), a fresh material field."""
    return MeshScene.from_geometry(cfg, copy.deepcopy(previous.scene.state_dict()), device)


@dataclass(frozen=True)
class ShapeStart:
    """The fresh scene of a first stage that is a surface, not a NeRF (Fantasia3D's geometry): called like a
    scene class, `(cfg, device)`, it starts the SDF from `geometry.init`; `from_state` restores a checkpoint."""

    def __call__(self, cfg: Config, device: str) -> MeshScene:
        return MeshScene.from_shape(cfg, device)

    @staticmethod
    def from_state(cfg: Config, state: dict, device: str) -> MeshScene:
        return MeshScene.from_state(cfg, state, device)


def mesh_from_gaussians(cfg: Config, previous: Trainer, kept: dict, device: str, progress: bool,
                        scene_class: type[MeshScene] = MeshScene) -> MeshScene:
    """DreamGaussian's texture stage's start: the Gaussians' surface at the level their kept mesh was extracted
    at, with a texture field fitted to their colours."""
    return texture_scene(cfg, previous.scene, float(kept["threshold"]), device, progress=progress,
                         fit_steps=cfg.gaussians.texture_fit_steps, scene_class=scene_class)


def image_mesh_from_gaussians(cfg: Config, previous: Trainer, kept: dict, device: str, progress: bool) -> MeshScene:
    """The image run's texture stage's start: as `mesh_from_gaussians`, in the scene that sees the reference view."""
    return mesh_from_gaussians(cfg, previous, kept, device, progress, scene_class=ReferenceViewTextureScene)


NERF = Stage("nerf", NeRFScene)
# image-to-3D's NeRF (zero123): the same field, also held to the input image from the reference camera
IMAGE_NERF = Stage("nerf", ReferenceViewNeRFScene, diverged_hint="lower optim.lr or guidance.zero123.guidance_scale "
                                                                  "and resume")
MESH = Stage("mesh", MeshScene, section="mesh", start=mesh_from_nerf, configure=mesh_stage_config,
             diverged_hint="lower mesh.lr_sdf or mesh.lr_texture and resume")
# image-to-3D's mesh stage (zero123-mesh, zero123-refine): Magic3D's, the reference view's losses kept
IMAGE_MESH = Stage("mesh", ReferenceViewMeshScene, section="mesh", start=image_mesh_from_nerf,
                   configure=mesh_stage_config, diverged_hint="lower mesh.lr_sdf or mesh.lr_texture and resume")
GEOMETRY = Stage("geometry", MeshScene, section="geometry", start=mesh_from_nerf, configure=mesh_stage_config,
                 guidance="prior", diverged_hint="lower geometry.lr_sdf or geometry.guidance_scale and resume")
TEXTURE = Stage("texture", MeshScene, section="texture", start=mesh_from_mesh, configure=mesh_stage_config,
                diverged_hint="lower texture.lr_texture or guidance.vsd.lora_lr and resume")
FANTASIA3D_GEOMETRY = Stage("geometry", ShapeStart(), section="geometry", configure=mesh_stage_config,
                            diverged_hint="lower geometry.lr_sdf or geometry.guidance_scale and resume")
APPEARANCE = Stage("appearance", MeshScene, section="appearance", start=material_from_geometry,
                   configure=mesh_stage_config, diverged_hint="lower appearance.lr_texture and resume")

GAUSSIANS = Stage("gaussians", GaussianScene, reads=("gaussians",),
                  diverged_hint="lower gaussians.lr_position or guidance.sd.guidance_scale and resume")
# DreamGaussian's image run: the same Gaussians, also held to the input image from the reference camera
IMAGE_GAUSSIANS = Stage("gaussians", ReferenceViewGaussianScene, reads=("gaussians",),
                        diverged_hint="lower gaussians.lr_position or guidance.zero123.guidance_scale and resume")


def texture_objective(guidance: Any, cfg: Config) -> Any:
    """DreamGaussian's texture stage's objective (gaussians.texture_objective): the prior's SDEdit refinement
    (threed/guidance/sdedit.py), or its SDS as the guidance gives it."""
    g = cfg.gaussians
    if g.texture_objective == "sds":
        return guidance
    if not hasattr(guidance, "sdedit_space"):
        raise UserError(f"gaussians.texture_objective=sdedit needs a prior that can edit an image (stable_diffusion, "
                        f"zero123, oracle), not {cfg.guidance.type}: pass gaussians.texture_objective=sds")
    from threed.guidance.sdedit import SDEditGuidance

    return SDEditGuidance(guidance, g.refine_strength, g.refine_steps)


GAUSSIAN_TEXTURE = Stage("texture", MeshScene, section="texture", start=mesh_from_gaussians,
                         configure=mesh_stage_config, objective=texture_objective,
                         diverged_hint="lower texture.lr_texture and resume")
# the image run's: the texture also held to the input image where the fixed surface faces the reference camera
IMAGE_GAUSSIAN_TEXTURE = Stage("texture", ReferenceViewTextureScene, section="texture", start=image_mesh_from_gaussians,
                               configure=mesh_stage_config, objective=texture_objective,
                               diverged_hint="lower texture.lr_texture and resume")


def offsets(stages: tuple[Stage, ...], cfg: Config) -> list[int]:
    """Each stage's first step on the run's step axis (metrics.jsonl): the earlier stages' steps summed."""
    out, total = [], 0
    for stage in stages:
        out.append(total)
        total += stage.steps(cfg)
    return out
