"""Fantasia3D (Chen et al. 2023): geometry and appearance learnt apart, as threestudio's fantasia3d and
fantasia3d-texture configs run them, one after the other in one run directory.

1. `geometry`: a DMTet surface started from a sphere (or a guide mesh, `--init-mesh`), shaped from its normal
   maps under SDS with Fantasia3D's weighting sqrt(abar) (1 - abar); for the first `geometry.latent_steps` the
   normal map and mask, downsampled to 64², stand in for the latent (no encoder), then the normal map is
   encoded like an image.
2. `appearance`: that surface kept bit for bit (its geometry learning rates are 0), a material field (albedo,
   roughness, metallic) shaded by split-sum image-based lighting of an environment map (threed/render/ibl.py),
   trained under SDS; exported as a PBR GLB (metallicRoughnessTexture) and OBJ (map_Pr, map_Pm).
"""

from __future__ import annotations

from threed.methods.method import Method
from threed.stages import APPEARANCE, FANTASIA3D_GEOMETRY

METHOD = Method(
    name="fantasia3d", summary="a DMTet surface from normal maps (from a sphere or a guide mesh), then a PBR "
                               "material under image-based lighting, exported as a PBR GLB/OBJ",
    preset="fantasia3d", cpu_preset="fantasia3d", priors=("stable_diffusion", "oracle"),
    stages=(FANTASIA3D_GEOMETRY, APPEARANCE), prior_presets={"oracle": "fantasia3d-oracle"})
