"""End to end: dreamgaussian under the oracle prior recovers a sphere from tests/shapes.py, in the reference's
frame, with the dreamgaussian-oracle preset's defaults (the texture stage cut to its minimum: 2 steps, no fit
of the texture to the Gaussians' colours, a 16-cell grid; the mesh compared here is the Gaussian stage's,
written before the texture stage starts).

The Gaussian stage's mesh (mesh-gaussians.obj: marching cubes of the Gaussians' summed opacity field at the
level the silhouettes choose) is compared with the reference by Chamfer-L1 relative to its bounding-box
diagonal (threed/metrics.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trimesh

import shapes
from threed import pipeline
from threed.config import build_config
from threed.metrics import mesh_distance

pytestmark = pytest.mark.slow


def test_dreamgaussian_oracle_recovers_a_sphere(tmp_path: Path) -> None:
    """The preset's 300 steps (seed 0, one thread, the shared 2-core CPU under load average 8-12), its oracle
    ray casting the reference views then; the preset now rasterizes them (guidance.oracle.renderer): 0.607%
    Chamfer-L1 (F@1% 0.970), the Gaussian stage in 216 s of wall time on one thread of a machine running
    another job, where the ray-cast oracle took more than 12 minutes.

    Measured with the ray-cast oracle: 15075 Gaussians at the end, Chamfer-L1 0.604% of the diagonal (F@1% 0.976) at the
    automatic level (1.01%, F@1% 0.50, at DreamGaussian's level 1), about 0.5 s of CPU per step (wall times on
    that machine were 3-8x longer). Asserted: within 1% (the target of the method's issue), 1.66x the measured value. The ray-cast
    run was estimated at 150-200 s of CPU from its per-step times; it took longer.
    """
    ref = shapes.sphere()
    reference = shapes.save(ref, tmp_path / "sphere.ply")
    cfg = build_config("dreamgaussian-oracle", [f"guidance.oracle.reference={reference}", "device=cpu",
                                                "texture.steps=2", "gaussians.texture_fit_steps=0",
                                                "texture.resolution=16", "export.video=false", "export.preview_views=0",
                                                "export.formats=[obj]", "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    gaussians = mesh_distance(trimesh.load(run / "mesh-gaussians.obj", force="mesh", process=False), ref)
    print(gaussians)
    assert gaussians["chamfer_l1_rel"] <= 0.01
    assert (run / "gaussians.ply").is_file() and (run / "mesh.obj").is_file()
