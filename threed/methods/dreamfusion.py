"""DreamFusion: score distillation from Stable Diffusion, or from the oracle prior of a reference mesh.

Both priors go through the same SDS update (threed/guidance/sds.py); the oracle stands in for the
diffusion model where no weights exist, to measure shape recovery.
"""

from __future__ import annotations

from threed.config import Config
from threed.errors import UserError


def build_guidance(cfg: Config, device: str):
    g = cfg.guidance
    if g.type == "stable_diffusion":
        from threed.guidance.stable_diffusion import StableDiffusionGuidance

        return StableDiffusionGuidance(g, cfg.prompt, cfg.negative_prompt, cfg.camera, device, cfg.seed)
    if g.type == "oracle":
        from threed.guidance.oracle import OracleGuidance

        if not g.reference:
            raise UserError("the oracle prior needs a reference mesh: pass --reference PATH (OBJ/PLY/GLB)")
        return OracleGuidance(g, cfg.render, device, cfg.seed)
    raise UserError(f"method dreamfusion takes guidance.type stable_diffusion or oracle, not '{g.type}'")
