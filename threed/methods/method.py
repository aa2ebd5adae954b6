"""What a method is made of: its presets, the priors it takes, its stages (threed/methods/ declares each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from threed import priors
from threed.config import Config
from threed.stages import NERF, Stage


@dataclass(frozen=True)
class Method:
    """What a method is made of. `priors` are the guidance.type values it accepts, its default first;
    `stages` run in order (threed/stages.py: NERF, the volume field optimised through the renderer; MESH,
    a DMTet surface and texture started from the NeRF and optimised through the rasterizer). A method with
    `refines` takes its finished first stage from another run (`threed run --from RUN_DIR`)."""

    name: str
    summary: str
    preset: str  # the preset for a CUDA GPU
    cpu_preset: str  # taken without --preset where no CUDA GPU is visible
    priors: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = (NERF,)
    prior_presets: dict[str, str] = field(default_factory=dict)  # a preset tuned for a prior, e.g. oracle
    refines: bool = False
    sections: tuple[str, ...] = ()  # its own guidance.<section> settings (priors.METHOD_SECTIONS), e.g. vsd
    image: bool = False  # image-to-3D: it reconstructs the object of an input image (image.path, --image)
    image_variant: str = ""  # the method `--method <name> --image X` runs (DreamGaussian's image recipe)

    def build_guidance(self, cfg: Config, device: str, stage: Stage | None = None) -> Any:
        """The guidance callable for cfg (models are loaded here): the builder of the method's own section
        where it has one (vsd: ProlificDreamer's VSD), else the run's prior's (threed/priors.py); a stage
        that asks for the prior alone (ProlificDreamer's geometry stage: SDS) gets the prior's; a stage with an
        objective of its own (DreamGaussian's texture refinement) wraps it."""
        own = self.sections if stage is None or stage.guidance == "method" else ()
        guidance = priors.builder(cfg.guidance.type, own)(cfg, device)
        return stage.objective(guidance, cfg) if stage is not None and stage.objective is not None else guidance

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return next(s for s in self.stages if s.name == name)

    def planned_steps(self, cfg: Config) -> list[tuple[str, int]]:
        """(stage, its step count) for each stage, in order: the run's whole budget."""
        return [(s.name, s.steps(cfg)) for s in self.stages]

    def default_preset(self, prior: str | None, cuda: bool) -> tuple[str, str]:
        """(preset, why) when the user named none."""
        if prior in self.prior_presets:
            return self.prior_presets[prior], f"the {prior} prior"
        if not cuda and self.cpu_preset != self.preset:
            return self.cpu_preset, "no CUDA GPU is visible"
        return self.preset, ""
