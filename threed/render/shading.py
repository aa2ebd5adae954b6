"""DreamFusion shading: albedo, Lambertian under a point light, and textureless (white albedo, lit); and
normal maps, the image a geometry stage's prior scores (ProlificDreamer's stage 2, Fantasia3D).

Shared by the volume renderer and by anything that must render "the same way" (the oracle prior's
reference renders), so both apply one formula:

    colour = albedo * (ambient + (1 - ambient) * max(0, n . l))
    normal map = (n + 1) / 2   (world-space unit normal; threestudio's comp_normal)
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("albedo", "lambertian", "textureless", "normal")


def shade(albedo: Tensor, normal: Tensor | None, points: Tensor | None, light_position: Tensor | None,
          mode: str, ambient: float) -> Tensor:
    """Shade `albedo` (..., 3) at `points` (..., 3) with unit `normal` (..., 3).

    `light_position` broadcasts against `points` (e.g. (B, 1, 3) for (B, N, 3) points).
    """
    if mode == "albedo":
        return albedo
    if mode not in MODES:
        raise ValueError(f"unknown shading mode {mode!r}")
    if mode == "normal":
        assert normal is not None
        return (normal * 0.5 + 0.5).to(albedo.dtype)
    assert normal is not None and points is not None and light_position is not None
    light_dir = light_position - points
    light_dir = light_dir / light_dir.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    diffuse = (normal * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    lighting = ambient + (1.0 - ambient) * diffuse
    if mode == "textureless":
        return lighting.expand_as(albedo)
    return albedo * lighting


def pick_shading(configured: str, step: int, albedo_only_steps: int, textureless_prob: float,
                 generator: torch.Generator, albedo_prob: float = 0.0) -> str:
    """Per-step shading mode: fixed, or DreamFusion's random choice after an albedo-only warm-up.

    After the warm-up (threestudio's diffuse_with_point_light material): albedo with probability
    `albedo_prob` (its 1 - diffuse_prob), else textureless with probability `textureless_prob`, else
    lambertian; one draw per step, so with albedo_prob 0 the choice is the same as before it existed.
    """
    if configured != "random":
        return configured
    if step < albedo_only_steps:
        return "albedo"
    u = torch.rand((), generator=generator).item()
    if u < albedo_prob:
        return "albedo"
    if u < albedo_prob + (1.0 - albedo_prob) * textureless_prob:
        return "textureless"
    return "lambertian"


def soft_ambient(generator: torch.Generator | None) -> float:
    """Magic3D's soft shading (threestudio's soft_shading): the ambient share of the light drawn uniformly in
    [0, 1) per render, the rest diffuse, so the prior sees the shape under varying light contrast."""
    return torch.rand((), generator=generator).item()
