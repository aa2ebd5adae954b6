"""The method registry: a method composes the shared parts (field, renderer, prior, losses, stages).

Each method is a preset in configs/ plus a short module declaring `METHOD` (or `METHODS`); its guidance is
the prior registry's (threed/priors.py). `threed run --method M` and `threed bench --methods M,...` both
look methods up here, aliases included.
"""

from __future__ import annotations

from threed.errors import UserError
from threed.methods import (clip, dreamfusion, dreamgaussian, fantasia3d, magic3d, mvdream, prolificdreamer,
                            zero123)
from threed.methods.method import Method

__all__ = ["ALIASES", "METHODS", "Method", "for_image", "for_prior", "get", "names"]

METHODS: dict[str, Method] = {m.name: m for m in (dreamfusion.METHOD, clip.METHOD, *magic3d.METHODS,
                                                   prolificdreamer.METHOD, mvdream.METHOD, fantasia3d.METHOD,
                                                   *zero123.METHODS, *dreamgaussian.METHODS)}
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


def for_image() -> Method:
    """The image-to-3D method `threed run --image` takes when none is named."""
    for method in METHODS.values():
        if method.image:
            return method
    raise UserError("no image-to-3D method is available")
