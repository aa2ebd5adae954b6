"""DreamFusion: score distillation from Stable Diffusion, or from the oracle prior of a reference mesh.

Both priors go through the same SDS update (threed/guidance/sds.py); the oracle stands in for the
diffusion model where no weights exist, to measure shape recovery.
"""

from __future__ import annotations

from threed.methods.method import Method

METHOD = Method(
    name="dreamfusion", summary="SDS from Stable Diffusion (or the oracle prior) on a hash-grid NeRF",
    preset="dreamfusion-sd", cpu_preset="cpu-tiny", priors=("stable_diffusion", "oracle"),
    aliases=("sds",), prior_presets={"oracle": "oracle"})

