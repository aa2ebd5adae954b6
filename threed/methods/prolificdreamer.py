"""ProlificDreamer (Wang et al. 2023): variational score distillation (threed/guidance/vsd.py) in two stages.

1. `nerf`: a hash-grid NeRF rendered at 64x64 while the coarse shape forms and at 512x512 from step 5000,
   t_max dropping from 0.98 to 0.5 at the same step, ProlificDreamer's sparsity and opacity losses.
2. `mesh`: Magic3D's mesh stage (threed/scenes/mesh.py: DMTet surface + texture field through the
   rasterizer) under VSD with a fresh particle score. The paper refines the geometry first (under SDS)
   and then the texture with the geometry fixed (under VSD); threed refines both together, as Magic3D
   does. `mesh.lr_sdf=0 mesh.lr_deformation=0` keeps the geometry fixed (the paper's texture stage).

Its settings are its own section, guidance.vsd, in the prior registry (threed/priors.py), whose builder
(threed.guidance.vsd.build_vsd) makes the guidance of both stages for either prior.
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import MESH, NERF

METHOD = Method(
    name="prolificdreamer", summary="VSD with a camera-conditioned LoRA: a hash-grid NeRF, then a textured DMTet mesh",
    preset="prolificdreamer", cpu_preset="prolificdreamer-cpu", priors=("stable_diffusion", "oracle"),
    aliases=("vsd",), stages=(NERF, MESH), prior_presets={"oracle": "prolificdreamer-oracle"},
    sections=("vsd",))

