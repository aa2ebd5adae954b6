"""End to end: ProlificDreamer's VSD recovers a known shape with the oracle prior as the data score and a
pixel UNet, trained from random weights during the run, as the particle score (configs/prolificdreamer-oracle.yaml).

The exported OBJ is compared with the reference as tests/test_oracle_convergence.py does: Chamfer-L1 and
F-score relative to the reference's bounding-box diagonal (threed/metrics.py) and the bounding box (same frame).
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


def _recover(shape: str, steps: int, tmp_path: Path) -> dict:
    ref = shapes.ALL[shape]()
    reference = shapes.save(ref, tmp_path / f"{shape}.ply")
    cfg = build_config("prolificdreamer-oracle", [f"guidance.oracle.reference={reference}", f"steps={steps}",
                                                  "device=cpu", "export.video=false", "export.preview_views=0",
                                                  "export.formats=[obj]", "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    pred = trimesh.load(run / "mesh.obj", force="mesh", process=False)
    out = mesh_distance(pred, ref)
    diagonal = float(np.linalg.norm(ref.bounds[1] - ref.bounds[0]))
    out["bbox_error_rel"] = float(np.abs(pred.bounds - ref.bounds).max()) / diagonal
    print(shape, steps, {k: round(v, 4) for k, v in out.items()})
    return out


def test_vsd_recovers_a_torus(tmp_path: Path) -> None:
    """Torus (genus 1), 300 steps of VSD.

    MEASURED
    """
    m = _recover("torus", 300, tmp_path)
    assert m["chamfer_l1_rel"] <= 0.01
    assert m["fscore_1pct"] >= 0.9
    assert m["bbox_error_rel"] <= 0.02
