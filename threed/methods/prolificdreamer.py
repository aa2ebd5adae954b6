"""ProlificDreamer (Wang et al. 2023): variational score distillation (threed/guidance/vsd.py) in three stages,
as the paper and threestudio's prolificdreamer, -geometry and -texture configs run it.

1. `nerf`: a hash-grid NeRF rendered at 64x64 while the coarse shape forms and at 512x512 from step 5000,
   t_max dropping from 0.98 to 0.5 at the same step, ProlificDreamer's sparsity and opacity losses; VSD.
2. `geometry`: a DMTet surface started from the NeRF's (threed/scenes/mesh.py), shaped from its normal maps
   under the prior's SDS alone (CFG 100) with normal-consistency and Laplacian regularisers.
3. `texture`: that surface kept bit for bit, its texture field trained under VSD with a fresh particle score.

Its settings are its own section, guidance.vsd, in the prior registry (threed/priors.py), whose builder
(threed.guidance.vsd.build_vsd) makes the VSD guidance of stages 1 and 3 for either prior.
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import GEOMETRY, NERF, TEXTURE

METHOD = Method(
    name="prolificdreamer", summary="VSD with a camera-conditioned LoRA: a hash-grid NeRF, a DMTet surface from normal maps, its texture",
    preset="prolificdreamer", cpu_preset="prolificdreamer-cpu", priors=("stable_diffusion", "oracle"),
    aliases=("vsd",), stages=(NERF, GEOMETRY, TEXTURE), prior_presets={"oracle": "prolificdreamer-oracle"},
    sections=("vsd",))

