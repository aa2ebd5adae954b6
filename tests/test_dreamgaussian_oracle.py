"""End to end: dreamgaussian under the oracle prior recovers a sphere from tests/shapes.py, in the reference's
frame, with the dreamgaussian-oracle preset's defaults: both stages, the texture stage with its fit of the
texture to the Gaussians' colours (only the video and the preview are left out, and the GLB).

The Gaussian stage's mesh (mesh-gaussians.obj: marching cubes of the Gaussians' summed opacity field at the
level the silhouettes choose) and the texture stage's (mesh.obj, the same surface re-extracted from the
tetrahedral grid, its colours the refined texture's) are compared with the reference by Chamfer-L1 relative to
its bounding-box diagonal (threed/metrics.py), and the final colours with the reference's vertex colours
(threed.metrics.color_error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trimesh

import shapes
from threed import pipeline
from threed.config import build_config
from threed.metrics import color_error, mesh_distance

pytestmark = pytest.mark.slow(minutes=1.6)  # on one thread beside a second worker


def test_dreamgaussian_oracle_recovers_a_sphere(tmp_path: Path) -> None:
    """The preset's 300 Gaussian steps and 20 texture steps (seed 0). Measured on the shared 2-core CPU under
    load average ~10, one thread, with video and preview: 108 s of CPU time in all (user + sys; 9.6 min of
    wall time at that load) of which the Gaussian stage 60 s, its mesh export 16 s, the texture stage's start
    (tetrahedral grid and texture fit) 17 s, the texture stage 3.5 s, its export 4.7 s (docs/PERFORMANCE.md).
    14996 Gaussians at the end. This test (no video, preview or GLB): 95 s of CPU with pytest's start, 132 s
    of wall time at load average 4-6 (before the rasterizer and the opacity field were made sparse, 121 s of
    wall time on 2 threads with the texture stage cut to 2 steps and no texture fit).

    Chamfer-L1: mesh-gaussians.obj 0.634% of the diagonal (F@1% 0.973), mesh.obj 0.639% (F@1% 0.967).

    Asserted: both within 1% (the target of the method's issue), 1.56x the measured value. Colour error of
    mesh.obj 0.021 (mesh-gaussians.obj 0.0095; the best single colour 0.087): asserted <= 0.04, under half the
    single colour's.

    Those numbers were measured with the texture stage under SDS. Since the texture stage refines by SDEdit
    (gaussians.texture_objective, DreamGaussian's; the oracle's denoiser through the 50 DDIM steps), measured on
    the idle 2-core CPU: mesh.obj 0.639% (F@1% 0.967), colour error 0.022, this test 101 s of CPU and of wall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as measured; on a loaded 2-core machine two threads cost 2-5x the CPU time
    try:
        _recover(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _recover(tmp_path: Path) -> None:
    ref = shapes.sphere()
    reference = shapes.save(ref, tmp_path / "sphere.ply")
    cfg = build_config("dreamgaussian-oracle", [f"guidance.oracle.reference={reference}", "device=cpu",
                                                "export.video=false", "export.preview_views=0",
                                                "export.formats=[obj]", "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    assert (run / "gaussians.ply").is_file()
    gaussians = mesh_distance(trimesh.load(run / "mesh-gaussians.obj", force="mesh", process=False), ref)
    final_mesh = trimesh.load(run / "mesh.obj", force="mesh", process=False, skip_materials=True)
    final = mesh_distance(final_mesh, ref)
    colour = color_error(final_mesh, ref)
    print(gaussians, final, colour)
    assert gaussians["chamfer_l1_rel"] <= 0.01
    assert final["chamfer_l1_rel"] <= 0.01
    assert colour <= 0.04
