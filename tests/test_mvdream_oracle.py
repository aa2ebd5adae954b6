"""MVDream's method under the oracle prior recovers a known shape: its batches of 4-view objects, their cameras
(relative distances, azimuths 90 degrees apart), one timestep per batch, each object's views denoised jointly
and the x0-reconstruction loss with its std rescale (threed/guidance/mvdream.py) converge.

The shape is tests/shapes.py's duck (asymmetric, with a front: what multi-view scoring is for). Measured with
configs/mvdream-oracle.yaml (seed 0, one CPU thread, a 2-core machine shared with other work): 200 steps,
Chamfer-L1 0.666% of the reference's bounding-box diagonal (147 s CPU); 120 steps with the t range annealed
by step 100 (this test), 0.841% (101 s CPU, 450 s wall under load; 0.840% under pytest with two threads,
which cost 512 s CPU on the loaded machine, hence one thread here); with the reference views rasterized (the
preset's guidance.oracle.renderer) 0.840%, 114 s on one thread beside a second pytest worker. The threshold is
the issue's 1%: the measured 0.84% leaves 0.16% of the diagonal for run-to-run noise of the CPU kernels; a
broken grouping, camera or loss leaves the shape far beyond it (after one step the blob it starts from is at
28%).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trimesh

import shapes
from threed import pipeline
from threed.config import build_config
from threed.metrics import mesh_distance

pytestmark = pytest.mark.slow(minutes=1.9)  # on one thread beside a second worker


def test_mvdream_oracle_recovers_a_duck(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as measured; on a loaded 2-core machine two threads cost 5x the CPU time
    try:
        _recover(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _recover(tmp_path: Path) -> None:
    ref = shapes.duck()
    reference = shapes.save(ref, tmp_path / "duck.ply")
    cfg = build_config("mvdream-oracle", [f"guidance.oracle.reference={reference}", "steps=120", "device=cpu",
                                          "prompt=a duck", "guidance.t_min=[0, 0.98, 0.02, 100]",
                                          "guidance.t_max=[0, 0.98, 0.5, 100]", "export.video=false",
                                          "export.preview_views=0", "export.formats=[obj]", "checkpoint_every=0"])
    assert cfg.camera.views == 4 and cfg.render.batch_size == 4 and cfg.guidance.multiview.recon_loss
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    pred = trimesh.load(run / "mesh.obj", force="mesh", process=False)
    out = mesh_distance(pred, ref)
    print({k: round(v, 5) for k, v in out.items()})
    assert out["chamfer_l1_rel"] <= 0.01
