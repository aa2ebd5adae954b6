"""DreamGaussian (Tang et al. 2024): score distillation on 3D Gaussians, which densify as they train and
converge in hundreds of steps rather than a NeRF's thousands, then a mesh with its texture refined.

1. `gaussians`: 5000 Gaussians started in a ball (threed/scenes/gaussians.py), splatted at 128² growing to 512²,
   under the prior's SDS with t annealed from 0.98 to 0.02; cloned, split and pruned every 50 steps.
2. `texture`: the surface of their summed opacity field (marching cubes at 1, as DreamGaussian extracts it),
   kept fixed, its texture started from the Gaussians' colours and refined toward the prior's SDEdit edits of
   its renders (threed/guidance/sdedit.py; threed/stages.py's GAUSSIAN_TEXTURE).

From an image (`--method dreamgaussian --image photo.png`, which runs `dreamgaussian-image`, DreamGaussian's
configs/image.yaml): the prior is Zero-1-to-3 given the image, and the Gaussian stage also holds the reference
view to the image (RGB and mask losses, threed/scenes/reference.py), their weights growing with the step; the
texture stage pulls the texture toward the image where the surface faces the reference camera.

With MVDream (`--guidance mvdream`, dreamgaussian-mvdream, DreamGaussian's configs/text_mv.yaml) each step renders
one object as 4 views 90 degrees apart, which the multi-view model scores together; its texture stage edits
such groups too.

The Gaussians are also written as a standard 3DGS .ply (gaussians.ply) that splat viewers open.
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import GAUSSIAN_TEXTURE, GAUSSIANS, IMAGE_GAUSSIAN_TEXTURE, IMAGE_GAUSSIANS

METHOD = Method(
    name="dreamgaussian", summary="SDS on densifying 3D Gaussians, then a mesh whose texture is refined",
    preset="dreamgaussian", cpu_preset="dreamgaussian", priors=("stable_diffusion", "mvdream", "oracle"),
    aliases=("gaussians",), stages=(GAUSSIANS, GAUSSIAN_TEXTURE),
    prior_presets={"mvdream": "dreamgaussian-mvdream", "oracle": "dreamgaussian-oracle"},
    image_variant="dreamgaussian-image")

IMAGE_METHOD = Method(
    name="dreamgaussian-image", summary="image-to-3D on densifying 3D Gaussians: Zero-1-to-3's SDS and the input "
    "image's reference view, then a mesh whose texture is refined", preset="dreamgaussian-image",
    cpu_preset="dreamgaussian-image", priors=("zero123", "oracle"), stages=(IMAGE_GAUSSIANS, IMAGE_GAUSSIAN_TEXTURE),
    prior_presets={"oracle": "dreamgaussian-image-oracle"}, image=True)

METHODS = (METHOD, IMAGE_METHOD)
