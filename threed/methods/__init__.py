"""The method registry: a method composes the shared parts (field, renderer, prior, losses, stages).

Each method is a preset in configs/ plus a short module declaring `METHOD` (or `METHODS`); its guidance is
the prior registry's (threed/priors.py). `threed run --method M` and `threed bench --methods M,...` both
look methods up here, aliases included.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from threed import priors
from threed.config import Config
from threed.errors import UserError
from threed.stages import NERF, Stage

# Modules defining one method each; importing them is cheap (models load only when a run starts).
METHOD_MODULES = ("threed.methods.dreamfusion", "threed.methods.clip", "threed.methods.magic3d",
                  "threed.methods.prolificdreamer")


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
    module: str
    aliases: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = (NERF,)
    prior_presets: dict[str, str] = field(default_factory=dict)  # a preset tuned for a prior, e.g. oracle
    refines: bool = False
    sections: tuple[str, ...] = ()  # its own guidance.<section> settings (priors.METHOD_SECTIONS), e.g. vsd

    def build_guidance(self, cfg: Config, device: str) -> Any:
        """The guidance callable for cfg (models are loaded here): the builder of the method's own section
        where it has one (vsd: ProlificDreamer's VSD), else the run's prior's (threed/priors.py)."""
        return priors.builder(cfg.guidance.type, self.sections)(cfg, device)

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


def _registry() -> dict[str, Method]:
    methods = []
    for name in METHOD_MODULES:
        module = importlib.import_module(name)
        methods += list(getattr(module, "METHODS", None) or (module.METHOD,))
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry()
ALIASES: dict[str, str] = {alias: m.name for m in METHODS.values() for alias in m.aliases}


def names() -> list[str]:
    """Every accepted method name, aliases included."""
    return sorted([*METHODS, *ALIASES])


def get(name: str) -> Method:
    key = ALIASES.get(name.strip(), name.strip())
    if key not in METHODS:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(names())}")
    return METHODS[key]


def for_prior(prior: str) -> Method:
    """The method whose default prior is `prior` (used when only --guidance is given)."""
    for method in METHODS.values():
        if method.priors[0] == prior:
            return method
    return next(m for m in METHODS.values() if prior in m.priors)
