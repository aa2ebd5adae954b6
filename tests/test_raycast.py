"""Mesh ray casting against independent references, and the mesh renderer's coverage and shading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

import shapes
from threed.cameras import make_cameras
from threed.raycast import build_clusters, corner_normals, raycast, render_mesh


def _mesh_tensors(mesh: trimesh.Trimesh) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


def _rays_at(targets: np.ndarray, rng: np.random.Generator, distance: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Rays from random points on a sphere of radius `distance` through `targets`."""
    origins = rng.normal(size=targets.shape)
    origins = distance * origins / np.linalg.norm(origins, axis=-1, keepdims=True)
    dirs = targets - origins
    return origins, dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


def _convex_entry_exit(mesh: trimesh.Trimesh, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit t of rays through a convex polytope, from its face planes (float64 slab method)."""
    n = mesh.face_normals  # outward
    p = mesh.triangles[:, 0]
    denom = d @ n.T  # (N, F)
    t = ((p * n).sum(-1)[None] - o @ n.T) / denom
    entering = denom < 0
    entry = np.where(entering, t, -np.inf).max(axis=1)
    exit_ = np.where(~entering, t, np.inf).min(axis=1)
    return entry, exit_


def _brute_force(mesh: trimesh.Trimesh, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nearest positive hit t per ray by plane intersection + same-side edge tests (float64), inf if none."""
    tri = mesh.triangles  # (F, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    denom = d @ n.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((tri[:, 0] * n).sum(-1)[None] - o @ n.T) / denom
    p = o[:, None] + t[..., None] * d[:, None]  # (N, F, 3)
    inside = np.ones(t.shape, dtype=bool)
    for i in range(3):
        a, b = tri[:, i], tri[:, (i + 1) % 3]
        inside &= (np.cross(b - a, p - a) * n).sum(-1) >= 0
    t = np.where(inside & (t > 1e-9) & np.isfinite(t), t, np.inf)
    return t.min(axis=1)


def test_convex_mesh_matches_face_plane_slabs() -> None:
    """Rays from outside aimed inside the inscribed ball hit at the polytope's entry t; rays from an
    interior point hit at its exit t; rays aimed away from the mesh miss. float32 vs float64: 1e-4."""
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    v, f = _mesh_tensors(mesh)
    rng = np.random.default_rng(0)
    targets = rng.uniform(-0.25, 0.25, size=(400, 3))
    o, d = _rays_at(targets, rng)
    hits = raycast(v, f, torch.tensor(o, dtype=torch.float32), torch.tensor(d, dtype=torch.float32))
    entry, _ = _convex_entry_exit(mesh, o, d)
    assert hits.hit.all()
    np.testing.assert_allclose(hits.t.numpy(), entry, atol=1e-4)

    inner = rng.uniform(-0.2, 0.2, size=(400, 3))
    d_in = rng.normal(size=(400, 3))
    d_in /= np.linalg.norm(d_in, axis=-1, keepdims=True)
    hits = raycast(v, f, torch.tensor(inner, dtype=torch.float32), torch.tensor(d_in, dtype=torch.float32))
    _, exit_ = _convex_entry_exit(mesh, inner, d_in)
    assert hits.hit.all()
    np.testing.assert_allclose(hits.t.numpy(), exit_, atol=1e-4)

    away = torch.tensor(o, dtype=torch.float32), torch.tensor(-d, dtype=torch.float32)
    misses = raycast(v, f, *away)
    assert not misses.hit.any()
    assert torch.isinf(misses.t).all() and (misses.face == -1).all() and (misses.bary == 0).all()


def test_nonconvex_mesh_matches_brute_force_and_hit_geometry() -> None:
    """A torus (rays can cross it up to four times): the nearest hit agrees with an independent float64
    brute force over all faces (t within 1e-4), and face + barycentrics rebuild the hit point."""
    mesh = shapes.torus()
    v, f = _mesh_tensors(mesh)
    rng = np.random.default_rng(1)
    o, d = _rays_at(rng.uniform(-0.6, 0.6, size=(300, 3)) * np.array([1.0, 0.3, 1.0]), rng)
    hits = raycast(v, f, torch.tensor(o, dtype=torch.float32), torch.tensor(d, dtype=torch.float32))
    expected = _brute_force(mesh, o, d)
    assert np.isfinite(expected).sum() > 100 and np.isinf(expected).sum() > 20  # both cases exercised
    np.testing.assert_array_equal(hits.hit.numpy(), np.isfinite(expected))
    hit = hits.hit.numpy()
    np.testing.assert_allclose(hits.t.numpy()[hit], expected[hit], atol=1e-4)
    point = o[hit] + hits.t.numpy()[hit, None] * d[hit]
    tri = mesh.triangles[hits.face.numpy()[hit]]
    rebuilt = (hits.bary.numpy()[hit, :, None] * tri).sum(1)
    np.testing.assert_allclose(rebuilt, point, atol=1e-4)


def test_results_do_not_depend_on_clustering_or_chunking() -> None:
    """Cluster size (1 face to all faces in one cluster) and memory chunking change only the speed."""
    mesh = shapes.cup()
    v, f = _mesh_tensors(mesh)
    rng = np.random.default_rng(2)
    o, d = _rays_at(rng.uniform(-0.5, 0.5, size=(500, 3)), rng)
    o, d = torch.tensor(o, dtype=torch.float32), torch.tensor(d, dtype=torch.float32)
    base = raycast(v, f, o, d)
    for clusters, chunk in [(build_clusters(v, f, 1), 1 << 20), (build_clusters(v, f, 4096), 1 << 20),
                            (build_clusters(v, f, 8), 4099)]:
        other = raycast(v, f, o, d, clusters=clusters, chunk=chunk)
        assert torch.equal(other.hit, base.hit)
        torch.testing.assert_close(other.t[base.hit], base.t[base.hit], rtol=0, atol=1e-6)


def test_rays_through_shared_edges_and_vertices_do_not_leak() -> None:
    """Rays aimed exactly at vertices and edge midpoints of a closed mesh must still hit it."""
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    v, f = _mesh_tensors(mesh)
    edges = mesh.vertices[mesh.edges_unique].mean(axis=1)
    targets = np.concatenate([mesh.vertices, edges])
    o = np.tile([[0.0, 0.0, 0.0]], (len(targets), 1))  # from the centre, out through each vertex/edge
    d = targets / np.linalg.norm(targets, axis=-1, keepdims=True)
    hits = raycast(v, f, torch.tensor(o, dtype=torch.float32), torch.tensor(d, dtype=torch.float32))
    assert hits.hit.all()
    np.testing.assert_allclose(hits.t.numpy(), np.linalg.norm(targets, axis=-1), atol=1e-5)


def _sphere_views(res: int, fov: float, distance: float):
    return make_cameras(torch.tensor([20.0, -10.0]), torch.tensor([70.0, 150.0]), torch.full((2,), distance),
                        torch.full((2,), fov), res, res)


def test_sphere_silhouette_area_matches_projection() -> None:
    """A sphere of radius r at distance D projects to a disc of radius f r / sqrt(D^2 - r^2) pixels.

    Measured (icosphere, 5120 faces, 64x64, fovy 50, D 1.75): relative area error -0.84% with
    supersample 1, -0.16% with 2, -0.07% with 4 (the polyhedron is slightly inside the sphere), so
    supersampling 2 must be within 0.5% and 4 at least as close as 1.
    """
    r, distance, fov, res = 0.5, 1.75, 50.0, 64
    v, f = _mesh_tensors(trimesh.creation.icosphere(subdivisions=4, radius=r))
    cams = _sphere_views(res, fov, distance)
    focal = 0.5 * res / math.tan(math.radians(fov) / 2)
    disc = math.pi * (focal * r / math.sqrt(distance**2 - r**2)) ** 2
    errors = {}
    for s in (1, 2, 4):
        img = render_mesh(v, f, torch.ones(len(v), 3), cams, "albedo", 0.1, torch.zeros(2, res, res, 3), supersample=s)
        errors[s] = (img[..., 0].sum(dim=(1, 2)) / disc - 1.0).abs().max().item()
    assert errors[2] < 0.005
    assert errors[4] <= errors[1]


def _analytic_sphere_shading(cams, r: float, ambient: float, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Textureless shading of an exact sphere at the origin, averaged over s x s rays per pixel, and a
    mask of the pixels whose rays all hit it."""
    fine = make_cameras(cams.elevation, cams.azimuth, cams.distance, torch.rad2deg(cams.fovy), cams.width * s,
                        cams.height * s, cams.light_position)
    o, d = fine.rays()
    b = (o * d).sum(-1)
    disc = b**2 - ((o * o).sum(-1) - r * r)
    t = -b - disc.clamp_min(0).sqrt()
    p = o + t[..., None] * d
    light = cams.light_position[:, None, None] - p
    ndotl = ((p / r) * light / light.norm(dim=-1, keepdim=True)).sum(-1).clamp_min(0)
    shading = ambient + (1 - ambient) * ndotl
    n, h, w = len(cams), cams.height, cams.width
    inside = (disc > 0).view(n, h, s, w, s).all(dim=4).all(dim=2)
    return shading.view(n, h, s, w, s).mean(dim=(2, 4)), inside


def test_render_composites_over_background_and_shades_like_shade() -> None:
    """Missed pixels are exactly the background; albedo is the vertex colour; Lambertian shading of a
    5,120-face icosphere matches an exact sphere's at every fully covered pixel (measured at 32x32,
    lights off the camera axis: mean error 5e-4, max 4.5e-3 near the silhouette; thresholds 1.5e-3 and
    1e-2), and lambertian = colour x textureless; silhouette pixels are fractional."""
    r, ambient = 0.5, 0.1
    v, f = _mesh_tensors(trimesh.creation.icosphere(subdivisions=4, radius=r))
    cams = make_cameras(torch.tensor([10.0, -5.0]), torch.tensor([30.0, 200.0]), torch.tensor([1.75, 1.6]),
                        torch.tensor([50.0, 40.0]), 32, 32, light_position=torch.tensor([[1.0, 1.5, 1.0], [-2.0, 0.3, 0.5]]))
    colors = torch.tensor([[0.2, 0.5, 0.7]]).expand(len(v), 3)
    bg = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    albedo = render_mesh(v, f, colors, cams, "albedo", ambient, bg)
    lit = render_mesh(v, f, colors, cams, "lambertian", ambient, bg)
    white = render_mesh(v, f, colors, cams, "textureless", ambient, bg)
    expected, inside = _analytic_sphere_shading(cams, r, ambient, 2)
    assert inside.sum() > 200
    assert torch.equal(albedo[:, 0, 0], bg[:, 0, 0])
    torch.testing.assert_close(albedo[inside], colors[0].expand(int(inside.sum()), 3), rtol=0, atol=1e-6)
    error = (white[inside] - expected[inside][:, None]).abs()
    assert error.mean() < 1.5e-3 and error.max() < 1e-2
    torch.testing.assert_close(lit[inside], white[inside] * colors[0], rtol=0, atol=1e-6)
    coverage = (albedo[..., 0] - bg[..., 0]) / (colors[0, 0] - bg[..., 0])
    assert ((coverage > 0.05) & (coverage < 0.95)).any()  # fractional silhouette pixels exist


def test_corner_normals_smooth_curves_but_keep_creases() -> None:
    """On a sphere every corner normal is the radial direction (within 2 degrees at 1280 faces); on a
    box every corner keeps its face normal (90-degree creases are beyond the 30-degree smoothing)."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v, f = _mesh_tensors(sphere)
    radial = v[f] / v[f].norm(dim=-1, keepdim=True)
    assert ((corner_normals(v, f) * radial).sum(-1) > math.cos(math.radians(2))).all()
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.3))
    v, f = _mesh_tensors(box)
    face_n = torch.tensor(box.face_normals, dtype=torch.float32)[:, None].expand(-1, 3, -1)
    torch.testing.assert_close(corner_normals(v, f), face_n, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(shapes.ALL))
def test_reference_shapes_are_closed_colored_and_in_the_cube(name: str, tmp_path) -> None:
    """Every test shape is watertight with outward winding, inside [-1, 1]^3 with a margin, at most
    3,000 faces, with vertex colours that vary, and survives a PLY round trip with its colours."""
    mesh = shapes.ALL[name]()
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert np.abs(mesh.vertices).max() <= 0.6
    assert len(mesh.faces) <= 3000
    colors = mesh.visual.vertex_colors[:, :3].astype(float)
    assert colors.std(axis=0).min() > 5  # varies over the surface in every channel
    loaded = trimesh.load(shapes.save(mesh, tmp_path / f"{name}.ply"), force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors, mesh.visual.vertex_colors)
