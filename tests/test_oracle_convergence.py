"""End to end: the oracle preset recovers known shapes, in the reference's frame, with their colours.

Each test trains `threed.pipeline.run` with the oracle prior against a mesh from tests/shapes.py and
compares the exported OBJ with the reference: Chamfer-L1 relative to the reference's bounding-box
diagonal (threed/metrics.py), the bounding box (same frame: not re-centred, re-scaled or mirrored),
and the vertex colours against the reference's colour at the nearest reference surface point.

Thresholds come from runs of exactly these settings (seed 0, 1 CPU thread, shared 2-core machine)
and are stated next to each test; they leave room for run-to-run noise of the CPU kernels, not for
a regression to a wrong shape. Steps are fewer than the preset's so the file stays within a few
minutes; the preset's own numbers are in configs/oracle.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

import shapes
from threed import pipeline
from threed.config import build_config
from threed.metrics import mesh_distance, sample_surface

pytestmark = pytest.mark.slow(minutes=2.7)  # each test, on one thread beside a second worker


def _obj_colors(path: Path) -> np.ndarray:
    """Per-vertex RGB from an OBJ's `v x y z r g b` rows, in file order."""
    rows = [line.split()[4:7] for line in path.read_text().splitlines() if line.startswith("v ")]
    return np.asarray(rows, dtype=np.float64)


def _reference_surface_colors(ref: trimesh.Trimesh, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` points uniform over the reference's surface and their barycentrically interpolated colours."""
    rng = np.random.default_rng(seed)
    area = np.asarray(ref.area_faces)
    face = rng.choice(len(area), size=n, p=area / area.sum())
    s, r2 = np.sqrt(rng.random(n)), rng.random(n)
    w = np.stack([1.0 - s, s * (1.0 - r2), s * r2], axis=-1)
    points = (np.asarray(ref.triangles)[face] * w[:, :, None]).sum(1)
    vertex_rgb = np.asarray(ref.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
    colors = (vertex_rgb[np.asarray(ref.faces)[face]] * w[:, :, None]).sum(1)
    return points, colors


def _recover(shape: str, steps: int, tmp_path: Path) -> dict:
    """Train the oracle preset on `shape` and measure the exported mesh against the reference."""
    ref = shapes.ALL[shape]()
    reference = shapes.save(ref, tmp_path / f"{shape}.ply")
    cfg = build_config("oracle", [f"guidance.oracle.reference={reference}", f"steps={steps}", "device=cpu",
                                  "export.video=false", "export.preview_views=0", "export.formats=[obj]",
                                  "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    pred = trimesh.load(run / "mesh.obj", force="mesh", process=False)
    colors = _obj_colors(run / "mesh.obj")
    assert colors.shape == (len(pred.vertices), 3)
    points, ref_colors = _reference_surface_colors(ref, 200_000, seed=0)
    _, nearest = cKDTree(points).query(np.asarray(pred.vertices))
    diagonal = float(np.linalg.norm(ref.bounds[1] - ref.bounds[0]))
    surface = sample_surface(pred, 20_000, seed=0)
    out = mesh_distance(pred, ref)
    out.update({
        "color_mae": float(np.abs(colors - ref_colors[nearest]).mean()),
        # the best a single colour can do: every vertex painted the reference's mean colour
        "constant_color_mae": float(np.abs(ref_colors.mean(0) - ref_colors[nearest]).mean()),
        "bbox_error_rel": float(np.abs(pred.bounds - ref.bounds).max()) / diagonal,
        "centroid_error_rel": float(np.linalg.norm(surface.mean(0) - sample_surface(ref, 20_000, 1).mean(0))) / diagonal,
        "threshold": float(json.loads((run / "mesh.json").read_text())["meshes"]["mesh.obj"]["threshold"]),
    })
    print(shape, steps, {k: round(v, 4) for k, v in out.items()})
    return out


def test_recovers_a_torus(tmp_path: Path) -> None:
    """Torus (genus 1: the hole must be carved out of the initial blob), 300 steps.

    Measured at 300 steps, seed 0 (2-core CPU, ~140 s with export): Chamfer-L1 0.54% of the diagonal,
    F-score@1% 0.955, bbox error 0.6% (level chosen by silhouettes alone, before the least-area rule
    among equally good levels: 0.96%, F 0.86, an inner surface); colour MAE 0.036 against 0.074 for the
    best single colour (ratio 0.49; read on the level set itself instead of half a cell inside: 0.099).
    With the reference views rasterized (the preset's guidance.oracle.renderer, one thread beside a second
    pytest worker, 158 s): Chamfer-L1 0.54%, F-score@1% 0.955, bbox error 1.07%, centroid 0.57%, colour MAE
    0.036 against 0.074.
    Thresholds: the issue's 1% Chamfer, F-score@1% 0.9, bbox and surface centroid 2%, colour MAE below
    0.7 of the best constant colour's.
    """
    m = _recover("torus", 300, tmp_path)
    assert m["chamfer_l1_rel"] <= 0.01
    assert m["fscore_1pct"] >= 0.9
    assert m["bbox_error_rel"] <= 0.02
    assert m["centroid_error_rel"] <= 0.02
    assert m["color_mae"] <= 0.7 * m["constant_color_mae"]


def test_recovers_a_sphere(tmp_path: Path) -> None:
    """Sphere (a thick, smooth solid: its unseen interior is never trained), 300 steps.

    Measured at 300 steps, seed 0: Chamfer-L1 0.45% of the diagonal, F-score@2% 1.0, bbox error 0.4%,
    surface centroid 0.36%, one component. Without filling enclosed cavities an inner surface remained
    (0.76%, centroid 3.3%); with the level from silhouettes alone, 1.63%. Colour MAE 0.043 against 0.088
    for the best single colour (ratio 0.49; read on the level set itself: 0.069). The same to the digits
    given with the reference views rasterized (the preset's guidance.oracle.renderer; 164 s on one thread
    beside a second pytest worker).
    Thresholds: the issue's 1% Chamfer, F-score@2% 0.85, bbox and surface centroid 2%, colour below 0.7
    of the best constant colour's.
    """
    m = _recover("sphere", 300, tmp_path)
    assert m["chamfer_l1_rel"] <= 0.01
    assert m["fscore_2pct"] >= 0.85
    assert m["bbox_error_rel"] <= 0.02
    assert m["centroid_error_rel"] <= 0.02
    assert m["color_mae"] <= 0.7 * m["constant_color_mae"]
