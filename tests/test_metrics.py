"""Shape metrics on point sets and meshes whose distances are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from threed.metrics import chamfer_l1, fscore, mesh_distance, sample_surface


def _sphere_points(n: int, radius: float, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).normal(size=(n, 3))
    return radius * p / np.linalg.norm(p, axis=-1, keepdims=True)


def test_chamfer_is_zero_on_identical_sets_and_the_offset_between_concentric_spheres() -> None:
    """Identical sets: exactly 0 and F = 1. Spheres of radius 0.5 and 0.55 (20,000 points each): every
    nearest distance is at least the 0.05 gap, plus a sampling excess measured at 5.5e-4; two
    independent samplings of one sphere measure 6.3e-3 (the sampling floor). Tolerance 2e-3."""
    a = _sphere_points(20000, 0.5, 0)
    assert chamfer_l1(a, a) == 0.0 and fscore(a, a, 1e-6) == 1.0
    offset = chamfer_l1(a, _sphere_points(20000, 0.55, 1))
    assert 0.05 <= offset < 0.05 + 2e-3
    assert chamfer_l1(a, _sphere_points(20000, 0.5, 2)) < 0.01


def test_fscore_counts_points_within_tau_both_ways() -> None:
    """Prediction = the 100 reference points, 30 of them also copied 0.2 off the grid: at tau 0.1
    precision is 100/130 and recall 1; at tau 0.3 both are 1; shifted far away F is 0."""
    ref = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0), [0.0], indexing="ij"), -1).reshape(-1, 3)
    moved = ref[:30] + np.array([0.0, 0.0, 0.2])  # 0.2 from their twin on a grid spaced 1.0
    pred = np.concatenate([ref, moved])
    assert fscore(pred, ref, 0.1) == pytest.approx(2 * (100 / 130) * 1.0 / (100 / 130 + 1.0))
    assert fscore(pred, ref, 0.3) == 1.0
    assert fscore(pred + 10.0, ref, 0.1) == 0.0


def test_sample_surface_is_seeded_on_the_surface_and_area_uniform() -> None:
    """Same seed, same points; points lie on the faces; on a 1 x 0.5 x 0.2 box the two x faces hold
    12.5% of the area and got 12.2% of 20,000 samples (binomial sd 0.23%); tolerance 1%."""
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.2))
    p = sample_surface(box, 20000, seed=0)
    np.testing.assert_array_equal(p, sample_surface(box, 20000, seed=0))
    assert not np.array_equal(p, sample_surface(box, 20000, seed=1))
    half = np.array([0.5, 0.25, 0.1])
    on_face = np.isclose(np.abs(p), half, atol=1e-9)
    assert on_face.any(axis=1).all() and (np.abs(p) <= half + 1e-9).all()
    frac_x = on_face[:, 0].mean()
    assert abs(frac_x - 2 * 0.5 * 0.2 / box.area) < 0.01


def test_mesh_distance_relative_to_the_reference_diagonal() -> None:
    """A sphere mesh against itself: Chamfer at the sampling floor (measured 6.2e-3, i.e. 0.36% of the
    diagonal) and F(2%) = 1; scaled by 1.1 (a 0.05 gap): Chamfer 0.0505 (measured), 2.9% of the
    diagonal, and no point within 1% or 2% of the diagonal (0.017, 0.035 < 0.05)."""
    ref = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    same = mesh_distance(ref, ref)
    assert set(same) == {"chamfer_l1", "chamfer_l1_rel", "fscore_1pct", "fscore_2pct"}
    assert same["chamfer_l1"] < 0.01 and same["fscore_2pct"] == 1.0 and same["fscore_1pct"] > 0.99
    bigger = ref.copy()
    bigger.apply_scale(1.1)
    far = mesh_distance(bigger, ref)
    diagonal = np.linalg.norm(ref.bounds[1] - ref.bounds[0])
    assert 0.049 <= far["chamfer_l1"] < 0.052  # faces lie slightly inside the vertices' sphere
    assert far["chamfer_l1_rel"] == pytest.approx(far["chamfer_l1"] / diagonal)
    assert far["fscore_1pct"] == 0.0 and far["fscore_2pct"] == 0.0
