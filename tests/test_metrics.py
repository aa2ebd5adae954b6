"""Shape metrics on point sets and meshes whose distances are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from threed.metrics import (REPORTED, chamfer_l1, fscore, mesh_distance, normal_consistency, reference_metrics,
                            sample_surface, sample_surface_normals)


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
    assert set(same) == {"chamfer_l1", "chamfer_l1_rel", "fscore_1pct", "fscore_2pct", "normal_consistency"}
    assert same["chamfer_l1"] < 0.01 and same["fscore_2pct"] == 1.0 and same["fscore_1pct"] > 0.99
    bigger = ref.copy()
    bigger.apply_scale(1.1)
    far = mesh_distance(bigger, ref)
    diagonal = np.linalg.norm(ref.bounds[1] - ref.bounds[0])
    assert 0.049 <= far["chamfer_l1"] < 0.052  # faces lie slightly inside the vertices' sphere
    assert far["chamfer_l1_rel"] == pytest.approx(far["chamfer_l1"] / diagonal)
    assert far["fscore_1pct"] == 0.0 and far["fscore_2pct"] == 0.0


# ---- normal consistency ------------------------------------------------------------------------------------

R = 0.5
SMOOTH = trimesh.creation.icosphere(subdivisions=5, radius=R)  # 20,480 faces: 0.9998 against itself


def _fibonacci_directions(n: int) -> np.ndarray:
    """`n` nearly uniform unit vectors (a Fibonacci lattice on the sphere)."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def _faceted_against_sphere(mesh: trimesh.Trimesh, order: int = 40) -> float:
    """Normal consistency of a convex polyhedron inscribed in a sphere against the sphere, from geometry
    alone (no sampling, no nearest neighbours): half the mean over the facets of |n_f . p/|p|| (a point p's
    nearest point on the sphere is radial; midpoint quadrature on `order`^2 sub-triangles per face), plus half
    the mean over the sphere's directions u of |n_f(u) . u| with f(u) the facet the ray along u leaves
    through (the nearest one except in slivers along the edges, where both facets' cosines nearly agree)."""
    i, j = np.meshgrid(np.arange(order), np.arange(order), indexing="ij")
    lower, upper = i + j < order, i + j < order - 1
    w1 = np.concatenate([(i[lower] + 1 / 3), (i[upper] + 2 / 3)]) / order
    w2 = np.concatenate([(j[lower] + 1 / 3), (j[upper] + 2 / 3)]) / order
    w = np.stack([1 - w1 - w2, w1, w2], axis=1)  # sub-triangle centroids: equal areas
    tri, normals, area = mesh.triangles, mesh.face_normals, mesh.area_faces
    points = np.einsum("kc,fcd->fkd", w, tri)
    facets = np.abs((points / np.linalg.norm(points, axis=2, keepdims=True) * normals[:, None]).sum(2)).mean(1)
    from_facets = (facets * area).sum() / area.sum()
    u = _fibonacci_directions(200000)
    exit_face = np.argmax((u @ normals.T) / (normals * mesh.triangles_center).sum(1), axis=1)
    from_sphere = np.abs((u * normals[exit_face]).sum(1)).mean()
    return float(0.5 * (from_facets + from_sphere))


def test_normal_consistency_of_a_smooth_sphere_with_itself_is_one() -> None:
    """Identical samples give exactly 1; the 20,480-face sphere against itself with another seed measured
    0.99979 (nearest samples a face apart: faces turn by 1.6 degrees); bound 0.9995."""
    points, normals = sample_surface_normals(SMOOTH, 5000, seed=0)
    assert normal_consistency(points, normals, points, -normals) == pytest.approx(1.0)  # winding ignored
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-12)
    assert mesh_distance(SMOOTH, SMOOTH)["normal_consistency"] > 0.9995


@pytest.mark.parametrize("subdivisions", [1, 2])
def test_normal_consistency_of_a_faceted_sphere_matches_its_geometry(subdivisions: int) -> None:
    """Icospheres of 80 and 320 faces against the smooth sphere: `_faceted_against_sphere` gives 0.98434
    and 0.99606, measured 0.98414-0.98428 and 0.99588-0.99593 over seeds 0-2 (the smooth sphere's own
    2e-4 below 1 accounts for the difference); tolerance 5e-4, a fortieth of the 80-face sphere's deficit."""
    coarse = trimesh.creation.icosphere(subdivisions=subdivisions, radius=R)
    expected = _faceted_against_sphere(coarse)
    assert expected < 0.997
    measured = mesh_distance(coarse, SMOOTH)["normal_consistency"]
    assert measured == pytest.approx(expected, abs=5e-4)


def test_normal_consistency_sees_orange_peel_that_chamfer_does_not() -> None:
    """The smooth sphere with radial bumps r = R (1 + 0.02 sin 25x sin 25y sin 25z) (slopes up to ~14
    degrees, heights 0.01): the faces' mean |cos| to the radial direction is 0.99276 and the metric measured
    0.99252 (against 0.99979 unbumped: 36x the deficit), while Chamfer-L1 moved only from 0.362% to 0.413%
    of the diagonal. Asserted: within 1e-3 of the faces' own value and below 0.995."""
    v = SMOOTH.vertices
    bumps = np.sin(25 * v[:, 0]) * np.sin(25 * v[:, 1]) * np.sin(25 * v[:, 2])
    peel = trimesh.Trimesh(v * (1 + 0.02 * bumps)[:, None], SMOOTH.faces)
    radial = peel.triangles_center / np.linalg.norm(peel.triangles_center, axis=1, keepdims=True)
    own = float((np.abs((peel.face_normals * radial).sum(1)) * peel.area_faces).sum() / peel.area_faces.sum())
    measured = mesh_distance(peel, SMOOTH)
    print({"own": own, **measured})
    assert measured["normal_consistency"] == pytest.approx(own, abs=1e-3)
    assert measured["normal_consistency"] < 0.995


def test_reference_metrics_name_each_stage_and_mark_a_missing_mesh(tmp_path) -> None:
    """A run's closing record: each mesh file's distances under its stage's prefix, equal to mesh_distance of
    the loaded files; a stage without a mesh file gets NaN under every key, so records keep their columns."""
    ref = tmp_path / "ref.ply"
    SMOOTH.export(ref)
    coarse = tmp_path / "mesh-nerf.obj"
    trimesh.creation.icosphere(subdivisions=1, radius=R).export(coarse)
    record = reference_metrics({"nerf_": coarse, "mesh_": ref, "later_": tmp_path / "missing.obj", "none_": None}, ref)
    assert set(record) == {f"{p}{k}" for p in ("nerf_", "mesh_", "later_", "none_") for k in REPORTED}
    expected = mesh_distance(trimesh.load(coarse, force="mesh"), trimesh.load(ref, force="mesh"))
    for k in REPORTED:
        assert record[f"nerf_{k}"] == pytest.approx(expected[k], abs=1e-6)
        assert np.isnan(record[f"later_{k}"]) and np.isnan(record[f"none_{k}"])
    assert record["mesh_normal_consistency"] > record["nerf_normal_consistency"]
    assert reference_metrics({"": coarse}, ref)["normal_consistency"] == record["nerf_normal_consistency"]
