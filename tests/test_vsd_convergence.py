"""End to end: ProlificDreamer's three stages recover a known shape and its colours with the oracle prior as the
data score and a pixel UNet, trained from random weights during the run, as the particle score
(configs/prolificdreamer-oracle.yaml: the NeRF stage under VSD, the geometry stage under SDS on normal maps,
the texture stage under VSD with a fresh particle score and the surface kept).

Each stage's mesh is compared with the reference as tests/test_oracle_convergence.py does: Chamfer-L1 and
F-score relative to the reference's bounding-box diagonal (threed/metrics.py), and the bounding box (same
frame): `mesh-nerf.obj` (the NeRF's, marching cubes), `mesh-geometry.obj` (the geometry stage's DMTet
surface) and `mesh.obj` (the texture stage's, textured). Colours: threed.metrics.color_error against the
reference's vertex colours (tests/shapes.py, position_colors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

import shapes
from threed import pipeline
from threed.config import build_config
from threed.metrics import color_error, mesh_distance

pytestmark = pytest.mark.slow(minutes=5.4)  # measured on one thread beside a second worker; started first


def _measure(path: Path, ref: trimesh.Trimesh) -> dict:
    pred = trimesh.load(path, force="mesh", process=False)
    out = mesh_distance(pred, ref)
    diagonal = float(np.linalg.norm(ref.bounds[1] - ref.bounds[0]))
    out["bbox_error_rel"] = float(np.abs(pred.bounds - ref.bounds).max()) / diagonal
    # a kept mesh is vertex-coloured (its MTL names no image); the final one is textured
    colored = trimesh.load(path, force="mesh", process=False, skip_materials=path.name != "mesh.obj")
    out["color_error"] = color_error(colored, ref)
    return out


def test_vsd_three_stages_recover_an_ellipsoid_and_its_colours(tmp_path: Path) -> None:
    """Ellipsoid (semi-axes 0.55, 0.35, 0.4: the round initial blob has to be stretched and squeezed); the
    NeRF stage 300 of the preset's 400 steps, the geometry stage 100 of its 200, the texture stage 50 of 100.

    Measured (seed 0, one thread, 2-core CPU, 6.0 min alone under a profiler, the reference views rasterized
    as the preset does): the NeRF's mesh 0.685% Chamfer-L1 of the diagonal, F@1% 0.925, box within 1.03%,
    normal consistency 0.990, colour error 0.086; after the geometry stage 0.589% (0.86x), F@1% 0.982, box
    within 0.88%, normal consistency 0.998, colour error 0.141 (its texture is the NeRF's albedo, read on the
    moved surface); after the texture stage the same distances to every digit and colour error 0.056 (0.40x).
    With the reference views ray cast: 0.696%, 0.600%, colour error 0.085, 0.143, 0.057, in 8.4 min.
    Asserted, about a third of margin: the NeRF within 0.9%, F@1% >= 0.88, box <= 1.5%; the geometry stage
    below the NeRF's Chamfer and within 0.8%, no F-score lost, normal consistency >= 0.995; the texture
    stage's surface at the geometry stage's distances (1e-6), its colour error at most 0.6x the geometry
    stage's and within 0.08.
    (The cavity of tests/shapes.py's cup is not recovered: the NeRF stage fills it and the geometry stage
    cannot carve it; docs/PERFORMANCE.md.)
    """
    ref = shapes.ellipsoid()
    reference = shapes.save(ref, tmp_path / "ellipsoid.ply")
    cfg = build_config("prolificdreamer-oracle", [f"guidance.oracle.reference={reference}", "steps=300",
                                                  "geometry.steps=100", "texture.steps=50", "device=cpu",
                                                  "export.video=false", "export.preview_views=0",
                                                  "export.formats=[obj]", "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    nerf, geometry, texture = (_measure(run / name, ref) for name in ("mesh-nerf.obj", "mesh-geometry.obj",
                                                                       "mesh.obj"))
    print({"nerf": nerf, "geometry": geometry, "texture": texture})
    assert nerf["chamfer_l1_rel"] <= 0.009
    assert nerf["fscore_1pct"] >= 0.88
    assert nerf["bbox_error_rel"] <= 0.015
    assert geometry["chamfer_l1_rel"] < nerf["chamfer_l1_rel"]
    assert geometry["chamfer_l1_rel"] <= 0.008
    assert geometry["fscore_1pct"] >= nerf["fscore_1pct"]
    assert geometry["normal_consistency"] >= 0.995
    for key in ("chamfer_l1_rel", "fscore_1pct", "normal_consistency"):
        assert texture[key] == pytest.approx(geometry[key], abs=1e-6), key
    assert texture["color_error"] <= 0.6 * geometry["color_error"]
    assert texture["color_error"] <= 0.08
