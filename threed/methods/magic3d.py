"""Magic3D: a coarse SDS NeRF at 64², then a DMTet mesh with a texture field refined through a rasterizer at
512² (Lin et al. 2023). Both stages score renders with the same prior (Stable Diffusion, or the oracle prior
of a reference mesh); the stages themselves are threed/stages.py's `nerf` and `mesh`, the fine stage's
scene threed/scenes/mesh.py, its settings the config's `mesh:` section.

`magic3d-refine` runs the mesh stage alone on the NeRF of an existing run (`--from RUN_DIR`, e.g. a
DreamFusion run), in a new run directory.
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import MESH, NERF

PRIORS = ("stable_diffusion", "oracle")

METHODS = (
    Method(name="magic3d", summary="coarse SDS NeRF (64²), then a DMTet mesh and texture refined at 512²",
           preset="magic3d", cpu_preset="magic3d-cpu", priors=PRIORS, stages=(NERF, MESH),
           prior_presets={"oracle": "magic3d-oracle"}),
    Method(name="magic3d-refine", summary="Magic3D's mesh stage on the NeRF of an existing run (--from RUN_DIR)",
           preset="magic3d", cpu_preset="magic3d-cpu", priors=PRIORS, stages=(NERF, MESH),
           prior_presets={"oracle": "magic3d-oracle"}, refines=True),
)

