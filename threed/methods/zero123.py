"""Image-to-3D with Zero-1-to-3 (Liu et al. 2023; Stable Zero123): one input image, a hash-grid NeRF.

Random views are scored by Zero123 given the input image and the relative camera (threed/guidance/zero123.py);
the reference view is held to the image itself by RGB and mask losses (threed/scenes/reference.py), as
threestudio's zero123 system and its configs/stable-zero123.yaml run it: renders at 64, 128 and 256 pixels in
batches of 12, 8 and 4 (render.progressive), 600 steps. The oracle prior of a reference mesh stands in for
Zero123 where no weights exist: the input image is then that mesh seen from the reference camera.
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import IMAGE_NERF

METHOD = Method(
    name="zero123", summary="image-to-3D: SDS from Zero-1-to-3 (Stable Zero123) and the input image's reference view",
    preset="zero123", cpu_preset="zero123-cpu", priors=("zero123", "oracle"), aliases=("stable-zero123",),
    stages=(IMAGE_NERF,), prior_presets={"oracle": "zero123-oracle"}, image=True)
