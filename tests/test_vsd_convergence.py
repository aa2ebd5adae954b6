"""End to end: ProlificDreamer's VSD recovers a known shape with the oracle prior as the data score and a
pixel UNet, trained from random weights during the run, as the particle score (configs/prolificdreamer-oracle.yaml:
the NeRF stage, then the mesh stage under VSD with a fresh particle score).

Both meshes are compared with the reference as tests/test_oracle_convergence.py does: Chamfer-L1 and F-score
relative to the reference's bounding-box diagonal (threed/metrics.py), and the bounding box (same frame):
`mesh-nerf.obj` (the NeRF's, marching cubes) and `mesh.obj` (the mesh stage's DMTet surface, textured).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

import shapes
from threed import pipeline
from threed.config import build_config
from threed.metrics import mesh_distance

pytestmark = pytest.mark.slow


def _measure(path: Path, ref: trimesh.Trimesh) -> dict:
    pred = trimesh.load(path, force="mesh", process=False)
    out = mesh_distance(pred, ref)
    diagonal = float(np.linalg.norm(ref.bounds[1] - ref.bounds[0]))
    out["bbox_error_rel"] = float(np.abs(pred.bounds - ref.bounds).max()) / diagonal
    return out


def test_vsd_recovers_an_ellipsoid_and_the_mesh_stage_improves_it(tmp_path: Path) -> None:
    """Ellipsoid (semi-axes 0.55, 0.35, 0.4: the round initial blob has to be stretched and squeezed); the
    NeRF stage 300 of the preset's 400 steps, the mesh stage 100 of its 200.

    Measured (seed 0, 2-core CPU, 160 s of training): the NeRF's mesh 0.676% Chamfer-L1 of the diagonal,
    F@1% 0.932, box within 1.05%; after the mesh stage 0.510%, F@1% 0.988, box within 0.79%. Asserted with
    about a third of margin: NeRF Chamfer <= 0.9%, F@1% >= 0.88, box <= 1.5%; the mesh stage removes at
    least 10% of the NeRF's Chamfer (measured 25%), loses no F-score and ends within 0.7%.
    (A torus at the NeRF stage's budget measured 1.64%, and 1.2% after 600 steps: the shape seen from outside
    is right, but the tube's hidden interior keeps low-density pockets whose surfaces count in the Chamfer
    distance. SDS with this preset's settings leaves them too (1.61%). Recorded in docs/PERFORMANCE.md.)
    """
    ref = shapes.ellipsoid()
    reference = shapes.save(ref, tmp_path / "ellipsoid.ply")
    cfg = build_config("prolificdreamer-oracle", [f"guidance.oracle.reference={reference}", "steps=300",
                                                  "mesh.steps=100", "device=cpu", "export.video=false",
                                                  "export.preview_views=0", "export.formats=[obj]",
                                                  "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    coarse, fine = _measure(run / "mesh-nerf.obj", ref), _measure(run / "mesh.obj", ref)
    print({"coarse": coarse, "fine": fine})
    assert coarse["chamfer_l1_rel"] <= 0.009
    assert coarse["fscore_1pct"] >= 0.88
    assert coarse["bbox_error_rel"] <= 0.015
    assert fine["chamfer_l1_rel"] <= 0.9 * coarse["chamfer_l1_rel"]
    assert fine["chamfer_l1_rel"] <= 0.007
    assert fine["fscore_1pct"] >= coarse["fscore_1pct"]
