"""Image-to-3D with Zero-1-to-3 (Liu et al. 2023; Stable Zero123): one input image, a hash-grid NeRF.

Random views are scored by Zero123 given the input image and the relative camera (threed/guidance/zero123.py);
the reference view is held to the image itself by RGB and mask losses (threed/scenes/reference.py), as
threestudio's zero123 system and its configs/stable-zero123.yaml run it: renders at 64, 128 and 256 pixels in
batches of 12, 8 and 4 (render.progressive), 600 steps. The oracle prior of a reference mesh stands in for
Zero123 where no weights exist: the input image is then that mesh seen from the reference camera.

`zero123-mesh` follows the NeRF with Magic3D's mesh stage (a DMTet surface and texture, rasterized), the
reference view's RGB and mask losses kept there (threed/scenes/reference.py); `zero123-refine` runs that mesh
stage alone on the NeRF of an existing zero123 run (`--from RUN_DIR`). threestudio has no Stable Zero123
refinement config: the mesh stage takes Magic3D's refine values (configs/magic3d-refine-sd.yaml) with Zero123's
cameras (configs/zero123-mesh.yaml says which).
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import IMAGE_MESH, IMAGE_NERF

METHOD = Method(
    name="zero123", summary="image-to-3D: SDS from Zero-1-to-3 (Stable Zero123) and the input image's reference view",
    preset="zero123", cpu_preset="zero123-cpu", priors=("zero123", "oracle"), aliases=("stable-zero123",),
    stages=(IMAGE_NERF,), prior_presets={"oracle": "zero123-oracle"}, image=True)

MESH_METHOD = Method(
    name="zero123-mesh", summary="zero123's NeRF, then Magic3D's mesh stage with the input image's reference view",
    preset="zero123-mesh", cpu_preset="zero123-mesh-cpu", priors=("zero123", "oracle"), stages=(IMAGE_NERF, IMAGE_MESH),
    image=True)
REFINE_METHOD = Method(
    name="zero123-refine", summary="zero123-mesh's mesh stage on the NeRF of an existing zero123 run (--from RUN_DIR)",
    preset="zero123-mesh", cpu_preset="zero123-mesh-cpu", priors=("zero123", "oracle"),
    stages=(IMAGE_NERF, IMAGE_MESH), refines=True, image=True)

METHODS = (METHOD, MESH_METHOD, REFINE_METHOD)
