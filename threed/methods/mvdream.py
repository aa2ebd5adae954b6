"""MVDream (Shi et al. 2023): a hash-grid NeRF scored four views at a time by a multi-view diffusion model.

As MVDream-threestudio's mvdream-sd21 config runs it: batches of objects of 4 views sharing elevation,
distance and fovy at azimuths 90 degrees apart (camera.views), 8 views at 64x64 and from step 5000 4 views
at 256x256, CFG 50, the x0-reconstruction loss with std rescale 0.5 (guidance.multiview, the method's own
section), t annealed from [0.98, 0.98] to [0.02, 0.5] by step 8000, random backgrounds shared by a batch.
With the oracle prior each 4-view group is denoised jointly by the optimal denoiser of a reference mesh's
renders (threed/guidance/mvdream.py MultiViewOracleGuidance). Magic3D's mesh stage can refine the result
(`threed run --method magic3d-refine --from RUN_DIR`).
"""

from __future__ import annotations

from threed.methods.method import Method

METHOD = Method(
    name="mvdream", summary="a multi-view diffusion prior (MVDream) scoring 4 views of a hash-grid NeRF at once",
    preset="mvdream", cpu_preset="mvdream", priors=("mvdream", "oracle"),
    prior_presets={"oracle": "mvdream-oracle"}, sections=("multiview",))
