"""Methods: each composes the shared parts with one kind of guidance (a preset in configs/ + a short file)."""

from __future__ import annotations

from threed.config import Config
from threed.errors import UserError

# method name -> (module, default preset)
METHODS = {
    "dreamfusion": ("threed.methods.dreamfusion", "dreamfusion-sd"),
    "clip": ("threed.methods.clip", "clip"),
}
ALIASES = {"sds": "dreamfusion"}


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        known = ", ".join(sorted([*METHODS, *ALIASES]))
        raise UserError(f"unknown method '{name}': choose one of {known}")
    return name


def default_preset(method: str) -> str:
    return METHODS[canonical(method)][1]


def build_guidance(cfg: Config, device: str):
    """The guidance callable for cfg.method (see the method's module)."""
    import importlib

    module = importlib.import_module(METHODS[canonical(cfg.method)][0])
    return module.build_guidance(cfg, device)
