"""CLIP-guided text-to-3D (Dream Fields style): maximise CLIP similarity of augmented renders to the prompt,
with a transmittance regulariser (cfg.loss.transmittance) keeping the volume sparse."""

from __future__ import annotations

from threed.config import Config
from threed.errors import UserError


def build_guidance(cfg: Config, device: str):
    if cfg.guidance.type != "clip":
        raise UserError(f"method clip takes guidance.type clip, not '{cfg.guidance.type}'")
    from threed.guidance.clip import ClipGuidance

    return ClipGuidance(cfg.guidance, cfg.prompt, cfg.negative_prompt, cfg.camera, device, cfg.seed)
