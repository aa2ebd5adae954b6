"""Mesh extraction: grid layout, marching-cubes geometry and orientation, clean-up, auto threshold; the repair
every exported mesh goes through (zero-area and duplicate faces, non-manifold edges, specks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from threed.cameras import make_cameras
from threed.errors import UserError
from threed.mesh import (Mesh, _components, auto_threshold, decimate, density_grid, extract_mesh, mesh_defects,
                         repair, vertex_normals)

RADIUS = 0.5


def soft_sphere(radius: float = RADIUS, center=(0.0, 0.0, 0.0), peak: float = 50.0, width: float = 0.01):
    """Density `peak` inside, 0 outside, with a sigmoid edge; the level peak/2 lies exactly at `radius`."""
    c = torch.tensor(center)
    return lambda p: peak * torch.sigmoid((radius - (p - c).norm(dim=-1)) / width)


def as_trimesh(mesh: Mesh) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)


def test_density_grid_layout_matches_lattice():
    """[i, j, k] is the density at (x_i, y_j, z_k) with x = linspace(-bound, bound, R), across chunk edges."""
    bound, res = 1.5, 7
    grid = density_grid(lambda p: p[:, 0] + 10 * p[:, 1] + 100 * p[:, 2], bound, res, "cpu", chunk=10)
    axis = torch.linspace(-bound, bound, res)
    expected = axis[:, None, None] + 10 * axis[None, :, None] + 100 * axis[None, None, :]
    assert grid.shape == (res, res, res) and grid.dtype == torch.float32
    torch.testing.assert_close(grid, expected)


def test_sphere_is_accurate_closed_and_outward():
    """R=64 over [-1, 1] (cell 0.032): measured max |r - 0.5| = 0.0020, volume error 0.23%,
    min cos(normal, radial) = 0.992. Bounds: a third of a cell, 1%, and 0.98."""
    albedo = lambda p: p * 0.5 + 0.5  # noqa: E731
    mesh = extract_mesh(soft_sphere(), albedo, bound=1.0, resolution=64, threshold=25.0)
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int64
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radius - RADIUS).max() < 0.01
    tm = as_trimesh(mesh)
    assert tm.is_watertight
    true_volume = 4.0 / 3.0 * np.pi * RADIUS ** 3
    assert tm.volume > 0  # positive signed volume: faces wind counter-clockwise seen from outside
    assert abs(tm.volume - true_volume) / true_volume < 0.01
    radial = mesh.vertices / radius[:, None]
    assert np.allclose(np.linalg.norm(mesh.normals, axis=1), 1.0, atol=1e-5)
    assert (mesh.normals * radial).sum(axis=1).min() > 0.98
    # Face normals from the winding agree with the vertex normals (both outward).
    face_normals = np.cross(*(mesh.vertices[mesh.faces[:, i]] - mesh.vertices[mesh.faces[:, 0]] for i in (1, 2)))
    assert ((face_normals * mesh.vertices[mesh.faces].mean(axis=1)).sum(axis=1) > 0).all()
    # Colours are read half a cell inside the surface (cell = 2 / 63 here).
    inside = mesh.vertices - 0.5 * (2.0 / 63) * mesh.normals
    np.testing.assert_allclose(mesh.colors, inside * 0.5 + 0.5, atol=1e-6)


def test_index_coordinates_map_exactly_to_scene_and_box_is_closed():
    """A density linear in x has its level set at x = 0.3 exactly (marching cubes interpolates linearly);
    the part touching the box is closed at the box faces, so the slab is [-1, 0.3] x [-1, 1]^2."""
    mesh = extract_mesh(lambda p: 50 + 100 * (0.3 - p[:, 0]), None, bound=1.0, resolution=32, threshold=50.0,
                        keep_components=0.0)
    np.testing.assert_allclose(mesh.vertices.min(axis=0), [-1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(mesh.vertices.max(axis=0), [0.3, 1.0, 1.0], atol=1e-6)
    tm = as_trimesh(mesh)
    assert tm.is_watertight
    np.testing.assert_allclose(tm.volume, 1.3 * 2 * 2, rtol=1e-5)


def test_small_floaters_are_dropped():
    """Big sphere r=0.45 and a blob r=0.07: measured 7596 vs 176 faces (ratio 0.023 < 0.05)."""
    big = soft_sphere(0.45, (-0.3, 0.0, 0.0))
    small = soft_sphere(0.07, (0.6, 0.6, 0.6))
    density = lambda p: big(p) + small(p)  # noqa: E731
    grid = density_grid(density, 1.0, 64, "cpu")
    both = extract_mesh(density, None, 1.0, 64, 25.0, keep_components=0.0, grid=grid)
    assert len(np.unique(_components(both.faces, len(both.vertices)))) == 2
    kept = extract_mesh(density, None, 1.0, 64, 25.0, keep_components=0.05, grid=grid)
    assert len(np.unique(_components(kept.faces, len(kept.vertices)))) == 1
    # Only the big sphere is left (a third of a cell from its surface), and no vertex is orphaned.
    assert np.abs(np.linalg.norm(kept.vertices - np.array([-0.3, 0.0, 0.0]), axis=1) - 0.45).max() < 0.01
    assert len(np.unique(kept.faces)) == len(kept.vertices)


def test_decimation_hits_target_and_keeps_shape():
    """9452 faces -> 2000: measured exactly 2000 faces, max |r - 0.5| = 0.0044 (bound: a cell, 0.032)."""
    mesh = extract_mesh(soft_sphere(), None, 1.0, 64, 25.0, decimate_faces=2000)
    assert 1800 <= len(mesh.faces) <= 2000
    assert np.abs(np.linalg.norm(mesh.vertices, axis=1) - RADIUS).max() < 0.032
    assert as_trimesh(mesh).volume > 0
    assert ((mesh.normals * mesh.vertices).sum(axis=1) > 0).all()
    assert len(np.unique(mesh.faces)) == len(mesh.vertices)


def _orbit(n: int = 8, size: int = 64):
    elevation = torch.tensor([0.0, 30.0, -20.0, 60.0, 10.0, 45.0, 0.0, 15.0])[:n]
    cams = make_cameras(elevation, torch.arange(n) * 45.0, torch.full((n,), 2.5), torch.full((n,), 40.0),
                        size, size)
    return cams.rays()


@pytest.mark.parametrize("profile", ["linear", "exponential"])
@pytest.mark.parametrize("radius", [0.3, 0.5, 0.7])
def test_auto_threshold_matches_silhouette_of_hard_sphere(profile: str, radius: float):
    """Target: the exact silhouette of a hard sphere of `radius`. The field's level set at L is a
    sphere of known radius r(L), so the chosen level must give r(L) ~ radius. Measured |r(L) - radius|
    <= 0.0031 over these cases at R = 64 and 128; a pixel at the sphere is ~0.028, bound 0.01."""
    if profile == "linear":
        field, radius_at = (lambda p: 100 * torch.relu(1 - p.norm(dim=-1))), (lambda level: 1 - level / 100)
    else:
        field, radius_at = (lambda p: 100 * torch.exp(-8 * p.norm(dim=-1))), (lambda level: -np.log(level / 100) / 8)
    rays_o, rays_d = _orbit()
    b = (rays_o * rays_d).sum(-1)
    target = (b * b - ((rays_o * rays_o).sum(-1) - radius ** 2) > 0).float()
    grid = density_grid(field, 1.0, 64, "cpu")
    level = auto_threshold(grid, 1.0, rays_o, rays_d, target)
    assert abs(radius_at(level) - radius) < 0.01


def test_level_search_and_extraction_show_progress_when_asked(capsys):
    density = soft_sphere()
    grid = density_grid(density, 1.0, 32, "cpu", progress=True)
    rays_o, rays_d = _orbit()
    b = (rays_o * rays_d).sum(-1)
    silhouette = (b * b - ((rays_o * rays_o).sum(-1) - RADIUS ** 2) > 0).float()
    auto_threshold(grid, 1.0, rays_o, rays_d, silhouette, progress=True)
    extract_mesh(density, None, 1.0, 32, 25.0, decimate_faces=100, grid=grid, progress=True)
    err = capsys.readouterr().err
    for step in ("density grid 32^3", "mesh level: rays", "mesh level: surfaces", "fill cavities", "marching cubes",
                 "clean-up", "decimation to 100 faces", "normals"):
        assert step in err, step
    extract_mesh(density, None, 1.0, 32, 25.0, grid=grid)  # the default: silent
    assert capsys.readouterr().err == ""


def test_empty_field_raises_user_error():
    empty = lambda p: torch.zeros(p.shape[0])  # noqa: E731
    with pytest.raises(UserError, match="empty"):
        extract_mesh(empty, None, 1.0, 16, 10.0)
    with pytest.raises(UserError, match="empty"):
        extract_mesh(soft_sphere(), None, 1.0, 16, 60.0)  # above the peak density 50
    rays_o, rays_d = _orbit(2, 8)
    with pytest.raises(UserError, match="empty"):
        auto_threshold(torch.zeros(8, 8, 8), 1.0, rays_o, rays_d, torch.ones(2, 8, 8))
    with pytest.raises(UserError, match="empty"):
        auto_threshold(density_grid(soft_sphere(), 1.0, 8, "cpu"), 1.0, rays_o, rays_d, torch.zeros(2, 8, 8))


def test_vertex_normals_weight_faces_by_area():
    """A vertex shared by a big face along +z and a small one along +x leans to +z by the area ratio."""
    v = np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float32)
    f = np.array([[0, 1, 2], [0, 3, 4]])  # areas 8 (normal +z) and 0.5 (normal +x)
    n = vertex_normals(v, f)[0]
    expected = np.array([0.5, 0.0, 8.0]) / np.hypot(0.5, 8.0)
    np.testing.assert_allclose(n, expected, atol=1e-6)


def test_enclosed_cavity_is_filled_not_an_inner_surface():
    """A shell (dense for 0.35 < r < 0.5, empty inside) gives one closed outer surface: the cavity is
    interior no render can see. Measured volume error against the r=0.5 ball: 0.18% at R=64 (cell 0.032);
    bound 2%."""
    def shell(p):
        r = p.norm(dim=-1)
        return 50.0 * ((r < RADIUS) & (r > 0.35)).float()

    mesh = extract_mesh(shell, None, bound=1.0, resolution=64, threshold=25.0)
    tm = as_trimesh(mesh)
    assert len(tm.split(only_watertight=False)) == 1
    assert tm.is_watertight
    assert abs(tm.volume - 4.0 / 3.0 * np.pi * RADIUS ** 3) / (4.0 / 3.0 * np.pi * RADIUS ** 3) < 0.02


# ---- repair ------------------------------------------------------------------------------------------------

CLEAN = {"zero_area_faces": 0, "duplicate_faces": 0, "duplicate_vertices": 0, "non_manifold_edges": 0,
         "non_manifold_vertices": 0, "boundary_edges": 0, "one_face_components": 0}


def assert_clean(vertices: np.ndarray, faces: np.ndarray, components: int) -> trimesh.Trimesh:
    """No defect by `mesh_defects`, and as a reader that merges coincident vertices loads it (trimesh's
    default processing): closed, consistently wound, `components` bodies, no zero-area face."""
    defects = mesh_defects(vertices, faces)
    assert {k: v for k, v in defects.items() if k != "components"} == CLEAN
    assert defects["components"] == components
    loaded = trimesh.Trimesh(vertices, faces, process=True)
    assert len(loaded.faces) == len(faces) and len(loaded.vertices) == len(vertices)  # nothing merged away
    assert loaded.is_watertight and loaded.is_winding_consistent
    assert len(loaded.split(only_watertight=False)) == components
    assert loaded.area_faces.min() > 0
    return loaded


def cube(offset=(0.0, 0.0, 0.0), subdivisions: int = 0) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    for _ in range(subdivisions):
        mesh = mesh.subdivide()
    mesh.apply_translation(offset)
    return mesh


def joined(*meshes: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    both = trimesh.util.concatenate(list(meshes))
    return np.asarray(both.vertices, np.float32), np.asarray(both.faces, np.int64)


def test_mesh_defects_counts_each_kind():
    """The counter the repair tests rely on, on meshes whose defects are known by construction."""
    ball = trimesh.creation.icosphere(2)
    v, f = np.asarray(ball.vertices, np.float32), np.asarray(ball.faces)
    assert mesh_defects(v, f) == {**CLEAN, "components": 1}
    speck = np.vstack([v, [[2, 2, 2], [2.1, 2, 2], [2, 2.1, 2]]])
    counted = mesh_defects(speck, np.vstack([f, [[len(v), len(v) + 1, len(v) + 2]]]))
    assert counted["one_face_components"] == 1 and counted["boundary_edges"] == 3 and counted["components"] == 2
    assert mesh_defects(v, np.vstack([f, f[:3]]))["duplicate_faces"] == 3
    # Two cubes sharing one edge: one non-manifold edge (4 faces), its 2 vertices joined at coincident copies.
    counted = mesh_defects(*joined(cube(), cube((1.0, 1.0, 0.0))))
    assert counted["non_manifold_edges"] == 1 and counted["duplicate_vertices"] == 2
    # A needle: one vertex moved onto its neighbour makes its two faces zero-area.
    needle = v.copy()
    needle[f[0, 0]] = needle[f[0, 1]]
    assert mesh_defects(needle, f)["zero_area_faces"] == 2 and mesh_defects(needle, f)["duplicate_vertices"] == 1


def test_repair_removes_zero_area_faces_without_moving_the_surface():
    """A needle (a vertex moved onto its neighbour: two faces with two corners at one point) is merged away;
    a cap (a corner moved onto the opposite edge, 1e-9 off it) is flipped with the face across that edge,
    which its two new faces tile exactly. No face is left with zero area, and the volume is unchanged."""
    ball = trimesh.creation.icosphere(2)
    v, f = np.asarray(ball.vertices, np.float64), np.asarray(ball.faces)
    a, b, c = f[0]
    needle = v.copy()
    needle[a] = v[b]
    cap = v.copy()
    cap[c] = 0.3 * v[a] + 0.7 * v[b] + 1e-9
    for moved in (needle, cap):
        assert mesh_defects(moved, f)["zero_area_faces"] >= 1
        rv, rf = repair(moved, f)
        loaded = assert_clean(rv, rf, components=1)
        assert abs(loaded.volume - trimesh.Trimesh(moved, f).volume) < 1e-6
    assert len(repair(cap, f)[1]) == len(f)  # flipped, not collapsed


def test_repair_leaves_a_margin_for_the_files_rounding():
    """A cap 2x the tolerance off its edge is no defect in memory (mesh_defects: thinner than the tolerance),
    but files round coordinates to ~1e-6, which could put it below: repair flips every face thinner than
    REPAIR_MARGIN x the tolerance, so the thinnest face left is at least that thick."""
    from threed.mesh import MERGE_TOLERANCE, REPAIR_MARGIN, _face_heights

    ball = trimesh.creation.icosphere(2)
    v, f = np.asarray(ball.vertices, np.float64), np.asarray(ball.faces)
    a, b, c = f[0]
    tol = MERGE_TOLERANCE * float(np.linalg.norm(v.max(axis=0) - v.min(axis=0)))
    edge = 0.3 * v[a] + 0.7 * v[b]
    outward = np.cross(v[b] - v[a], np.cross(v[c] - v[a], v[b] - v[a]))
    cap = v.copy()
    cap[c] = edge + 2.0 * tol * outward / np.linalg.norm(outward)
    assert mesh_defects(cap, f)["zero_area_faces"] == 0
    rv, rf = repair(cap, f)
    assert float(_face_heights(rv, rf)[0].min()) >= 0.99 * REPAIR_MARGIN * tol
    assert_clean(rv, rf, components=1)


def test_repair_drops_a_dangling_face_and_cuts_off_a_fin():
    """A face on its own and a face hung on one of the ball's edges (3 faces there) are no closed surface:
    both go, even with keep_components=0 (a closed surface has at least 4 faces), and the ball stays whole."""
    ball = trimesh.creation.icosphere(2)
    v, f = np.asarray(ball.vertices, np.float32), np.asarray(ball.faces)
    n = len(v)
    u, w = ball.edges_unique[0]
    v2 = np.vstack([v, [[3, 3, 3], [3.1, 3, 3], [3, 3.1, 3], [2, 2, 2]]])
    f2 = np.vstack([f, [[n, n + 1, n + 2]], [[u, w, n + 3]]])
    assert mesh_defects(v2, f2)["non_manifold_edges"] == 1
    rv, rf = repair(v2, f2, keep_components=0.0)
    loaded = assert_clean(rv, rf, components=1)
    assert len(rf) == len(f) and loaded.volume == pytest.approx(ball.volume, rel=1e-6)


@pytest.mark.parametrize("subdivisions", [0, 2])
def test_repair_separates_solids_that_share_an_edge(subdivisions: int):
    """Two cubes meeting along an edge (a chain of 1 or 4 non-manifold edges): the faces around each such
    edge are paired by the wedge of solid they enclose, so each cube comes out closed, on its own."""
    v, f = joined(cube(subdivisions=subdivisions), cube((1.0, 1.0, 0.0), subdivisions))
    assert mesh_defects(v, f)["non_manifold_edges"] == 2 ** subdivisions
    rv, rf = repair(v, f)
    loaded = assert_clean(rv, rf, components=2)
    assert len(rf) == len(f) and loaded.volume == pytest.approx(2.0, abs=1e-4)  # copies move by 1e-5


def test_repair_keeps_one_of_each_duplicate_face_and_joins_solids_that_share_a_face():
    """Duplicates with the same winding: one stays. A stray reversed copy on a surface: the copy wound like
    its neighbours stays. Two cubes sharing a face (one triple with both windings, each cube's own): a sheet
    of no thickness inside the union, which goes, leaving one closed 2 x 1 x 1 box."""
    ball = trimesh.creation.icosphere(2)
    v, f = np.asarray(ball.vertices, np.float32), np.asarray(ball.faces)
    doubled = np.vstack([f, f[:5], f[:5], f[5:7][:, ::-1]])
    rv, rf = repair(v, doubled)
    assert_clean(rv, rf, components=1)
    assert len(rf) == len(f) and trimesh.Trimesh(rv, rf).volume == pytest.approx(ball.volume, rel=1e-6)
    left = cube((-0.5, 0.0, 0.0))
    right = left.copy()
    right.vertices[:, 0] *= -1  # the mirror image shares the x = 0 face with the same triangulation
    right.faces = right.faces[:, ::-1]
    v, f = joined(left, right)
    assert mesh_defects(v, f)["duplicate_faces"] == 2
    rv, rf = repair(v, f)
    assert len(rf) == len(f) - 4
    assert assert_clean(rv, rf, components=1).volume == pytest.approx(2.0, rel=1e-6)


def test_repair_is_idempotent_and_keeps_a_clean_mesh_as_it_is():
    """A second repair changes nothing: the copies split apart are further apart than the merge tolerance."""
    v, f = joined(cube(subdivisions=1), cube((1.0, 1.0, 0.0), 1))
    once = repair(v, f)
    twice = repair(*once)
    np.testing.assert_array_equal(once[0], twice[0])
    np.testing.assert_array_equal(once[1], twice[1])
    ball = trimesh.creation.icosphere(2)
    same = repair(ball.vertices, ball.faces)
    np.testing.assert_array_equal(same[1], ball.faces)
    np.testing.assert_allclose(same[0], ball.vertices, atol=1e-7)


def staircase_density(p: torch.Tensor) -> torch.Tensor:
    """An ellipsoid's density rounded to quarter steps: many grid values lie exactly on the level 0, where
    marching cubes puts several vertices on one grid point (zero-area faces, before the repair)."""
    r = torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2 + (1.3 * p[:, 2]) ** 2)
    return torch.round(4 * (0.6 - r) / (2 / 31)) / 4


def test_marching_cubes_at_grid_values_on_the_level_gives_a_clean_mesh():
    """Raw marching cubes of `staircase_density` at 32^3: measured 512 zero-area faces and 256 coincident
    vertex pairs; extracted (repaired): none, one closed surface, the same volume within 0.5%."""
    import mcubes

    grid = density_grid(staircase_density, 1.0, 32, "cpu")
    raw_v, raw_f = mcubes.marching_cubes(grid.numpy().astype(np.float64), 0.0)
    raw = mesh_defects(raw_v, raw_f)
    assert raw["zero_area_faces"] > 100 and raw["duplicate_vertices"] > 50
    mesh = extract_mesh(staircase_density, None, 1.0, 32, 0.0, grid=grid)
    loaded = assert_clean(mesh.vertices, mesh.faces, components=1)
    raw_volume = trimesh.Trimesh(raw_v, raw_f).volume * (2 / 31) ** 3
    assert loaded.volume == pytest.approx(raw_volume, rel=0.005)


def test_decimated_meshes_are_repaired():
    """Decimation of the staircase mesh to 300 faces: whatever the collapses fold, the result is clean."""
    mesh = extract_mesh(staircase_density, None, 1.0, 32, 0.0)
    v, f = decimate(mesh.vertices, mesh.faces, 300)
    assert len(f) <= 300
    assert_clean(v, f, components=1)
