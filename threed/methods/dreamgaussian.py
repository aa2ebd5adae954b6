"""DreamGaussian (Tang et al. 2024): score distillation on 3D Gaussians, which densify as they train and
converge in hundreds of steps rather than a NeRF's thousands, then a mesh with its texture refined.

1. `gaussians`: 5000 Gaussians started in a ball (threed/scenes/gaussians.py), splatted at 128² growing to 512²,
   under the prior's SDS with t annealed from 0.98 to 0.02; cloned, split and pruned every 50 steps.
2. `texture`: the surface of their summed opacity field (marching cubes at 1, as DreamGaussian extracts it),
   kept fixed, its texture started from the Gaussians' colours and refined under the prior
   (threed/stages.py's GAUSSIAN_TEXTURE).

The Gaussians are also written as a standard 3DGS .ply (gaussians.ply) that splat viewers open.
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import GAUSSIAN_TEXTURE, GAUSSIANS

METHOD = Method(
    name="dreamgaussian", summary="SDS on densifying 3D Gaussians, then a mesh whose texture is refined",
    preset="dreamgaussian", cpu_preset="dreamgaussian", priors=("stable_diffusion", "oracle"),
    aliases=("gaussians",), stages=(GAUSSIANS, GAUSSIAN_TEXTURE), prior_presets={"oracle": "dreamgaussian-oracle"})
