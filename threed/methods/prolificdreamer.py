"""ProlificDreamer, stage 1: variational score distillation (threed/guidance/vsd.py) on a hash-grid NeRF,
rendered at 64x64 while the coarse shape forms and at 512x512 from step 5000, with t_max dropping from
0.98 to 0.5 at the same step and ProlificDreamer's sparsity and opacity losses.

The paper's stages 2-3 (mesh geometry refinement, then VSD texturing) need a mesh-stage trainer
(DMTet geometry plus a rasteriser), which threed does not have yet; this method is the NeRF stage only.
"""

from __future__ import annotations

from threed.config import Config
from threed.methods import Method

METHOD = Method(
    name="prolificdreamer", summary="VSD with a camera-conditioned LoRA (or the oracle prior) on a hash-grid NeRF",
    preset="prolificdreamer", cpu_preset="prolificdreamer-cpu", priors=("stable_diffusion", "oracle"),
    module=__name__, aliases=("vsd",), prior_presets={"oracle": "prolificdreamer-oracle"}, sections=("vsd",))


def build_guidance(cfg: Config, device: str):
    return cfg.guidance.vsd.build(cfg, device)
