"""DMTet: the Kuhn tetrahedral grid, marching tetrahedra, the SDF geometry and its regularisers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import trimesh

from threed.config import MeshConfig
from threed.errors import UserError
from threed.fields.dmtet import DMTetGeometry, marching_tetrahedra, sign_flip_loss
from threed.fields.tetgrid import CORNERS, LOCAL_EDGES, PERM_SIGN, TetGrid
from threed.mesh_losses import laplacian_smoothing, normal_consistency



def sphere_sdf(radius: float = 0.5, center=(0.0, 0.0, 0.0)):
    c = torch.tensor(center)
    return lambda p: (p - c.to(p)).norm(dim=-1) - radius


def torus_sdf(major: float = 0.5, minor: float = 0.2):
    """Torus around the y axis."""
    def sdf(p):
        ring = torch.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2) - major
        return torch.sqrt(ring ** 2 + p[:, 1] ** 2) - minor
    return sdf


def soft_sphere(radius: float = 0.5, center=(0.0, 0.0, 0.0), peak: float = 50.0, width: float = 0.01):
    """Density `peak` inside, 0 outside, sigmoid edge; the level peak/2 lies exactly at `radius` (as in test_mesh)."""
    c = torch.tensor(center)
    return lambda p: peak * torch.sigmoid((radius - (p - c.to(p)).norm(dim=-1)) / width)


def extract(grid: TetGrid, fn, deformation=None, max_offset=0.0):
    return marching_tetrahedra(grid, fn(grid.vertices()), deformation, max_offset)


def as_trimesh(vertices, faces) -> trimesh.Trimesh:
    return trimesh.Trimesh(vertices.detach().double().numpy(), faces.numpy(), process=False)


# ---- the grid ----------------------------------------------------------------------------------------

GRID = TetGrid((2, 3, 4), origin=(0.5, -1.0, 0.25), cell_size=0.3)


def test_tets_fill_the_box_with_positive_volumes():
    """Kuhn tetrahedra are all congruent: each has volume h^3 / 6, and together they fill the box."""
    tets = GRID.tets()
    assert tets.shape == (6 * 2 * 3 * 4, 4) == (GRID.num_tets, 4)
    p = GRID.vertices(dtype=torch.float64)[tets]
    volumes = torch.linalg.det(p[:, 1:] - p[:, :1]) / 6
    np.testing.assert_allclose(volumes.numpy(), GRID.cell_size ** 3 / 6, rtol=1e-9)
    assert volumes.sum().item() == pytest.approx(2 * 3 * 4 * GRID.cell_size ** 3, rel=1e-12)
    # Vertices are the lattice, x slowest.
    v = GRID.vertices(dtype=torch.float64)
    assert v.shape == (3 * 4 * 5, 3)
    np.testing.assert_allclose(v[1].numpy(), [0.5, -1.0, 0.55])
    np.testing.assert_allclose(v[-1].numpy(), [0.5 + 0.6, -1.0 + 0.9, 0.25 + 1.2])
    np.testing.assert_array_equal(PERM_SIGN, [1, -1, -1, 1, 1, -1])  # path-order volume sign = perm parity


def test_every_interior_face_is_shared_by_exactly_two_tets():
    """A conforming mesh: faces inside the box belong to two tetrahedra, faces on the box's surface to one."""
    tets = GRID.tets()
    faces = torch.cat([tets[:, [1, 2, 3]], tets[:, [0, 2, 3]], tets[:, [0, 1, 3]], tets[:, [0, 1, 2]]])
    unique, counts = torch.unique(faces.sort(dim=1).values, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    ijk = torch.round((GRID.vertices(dtype=torch.float64) - torch.tensor(GRID.origin, dtype=torch.float64))
                      / GRID.cell_size).long()
    corner = ijk[unique]  # (faces, 3 corners, 3 axes)
    top = torch.tensor(GRID.cells)
    on_box_plane = ((corner == 0).all(dim=1) | (corner == top).all(dim=1)).any(dim=1)
    assert torch.equal(on_box_plane, counts == 1)
    # Boundary faces tile the box's surface: 2 triangles per boundary square.
    nx, ny, nz = GRID.cells
    assert int((counts == 1).sum()) == 4 * (nx * ny + ny * nz + nx * nz)


def test_edges_are_unique_and_are_the_tets_edges():
    edges = GRID.edges()
    nx, ny, nz = GRID.cells
    closed_form = sum((nx + 1 - ox) * (ny + 1 - oy) * (nz + 1 - oz)
                      for ox, oy, oz in itertools.product((0, 1), repeat=3) if (ox, oy, oz) != (0, 0, 0))
    assert edges.shape == (closed_form, 2) == (GRID.num_edges, 2)
    assert len(torch.unique(edges, dim=0)) == len(edges)
    tet_ids = torch.arange(GRID.num_tets)
    tet_vertices, perm = GRID.tet_vertices(tet_ids)
    from_tets = torch.stack([tet_vertices[:, list(pair)] for pair in LOCAL_EDGES], dim=1).reshape(-1, 2)
    assert torch.equal(torch.unique(from_tets.sort(dim=1).values, dim=0), torch.unique(edges, dim=0))
    # Edge ids computed per tetrahedron name the same vertex pairs.
    ids = GRID.tet_edges(tet_vertices, perm).reshape(-1)
    lower, upper = GRID.edge_endpoints(ids)
    assert torch.equal(torch.stack([lower, upper], dim=1), from_tets)


def test_fit_grid_has_cubic_cells_covering_the_box():
    grid = TetGrid.fit((-0.3, -0.2, -0.5), (0.5, 0.2, 0.1), resolution=16)
    assert grid.cell_size == pytest.approx(0.05)
    assert grid.cells == (16, 8, 12)
    v = grid.vertices(dtype=torch.float64)
    assert (v.min(dim=0).values <= torch.tensor([-0.3, -0.2, -0.5], dtype=torch.float64) + 1e-9).all()
    assert (v.max(dim=0).values >= torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64) - 1e-9).all()


def test_deformation_bound_keeps_every_tet_positive():
    """Volume is affine in each corner's position, so over offsets in [-s, s]^3 per corner its minimum is
    at a box corner: enumerating all 2^12 corner patterns of each of the 6 tetrahedron shapes gives the
    exact worst case, 1/6 - s (cell units): below 1/6 of a cell no tetrahedron can invert. The default bound
    (threestudio's, one cell: test_default_offset_bound_is_threestudios) allows it."""
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=12)), dtype=torch.float64).view(-1, 4, 3)
    for s in (0.1, 0.15, 0.25):
        worst = min(float(torch.linalg.det((p := torch.as_tensor(CORNERS[k], dtype=torch.float64) + s * signs)[:, 1:]
                                           - p[:, :1]).mul(PERM_SIGN[k]).min()) / 6 for k in range(6))
        assert worst == pytest.approx(1 / 6 - s, abs=1e-12)


def test_default_offset_bound_is_threestudios():
    """threestudio's tetrahedra grid moves a vertex by at most (grid extent / isosurface_resolution) * tanh(d)
    (models/isosurface.py, normalize_grid_deformation): one cell of a grid of that resolution."""
    grid = TetGrid.fit((-0.3, -0.2, -0.5), (0.5, 0.2, 0.1), resolution=16)
    assert MeshConfig().deform_scale == 1.0
    assert DMTetGeometry(grid).max_offset == pytest.approx(0.8 / 16)  # the longest side / resolution


# ---- marching tetrahedra -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, sdf, volume, area, volume_tol, area_tol", [
    ("sphere", sphere_sdf(0.5), 4 / 3 * np.pi * 0.5 ** 3, 4 * np.pi * 0.5 ** 2, 0.012, 0.006),
    ("torus", torus_sdf(0.5, 0.2), 2 * np.pi ** 2 * 0.5 * 0.2 ** 2, 4 * np.pi ** 2 * 0.5 * 0.2, 0.025, 0.007),
])
def test_analytic_sdf_area_and_volume(name, sdf, volume, area, volume_tol, area_tol):
    """Over [-1, 1]^3, relative errors (volume, area) measured on a 2-core CPU (float32):
    sphere r=0.5: R=16 (-3.13%, -1.61%), R=32 (-0.79%, -0.40%), R=64 (-0.20%, -0.10%);
    torus 0.5/0.2: R=16 (-6.68%, -1.80%), R=32 (-1.63%, -0.45%), R=64 (-0.41%, -0.11%).
    Second order in the cell size (x0.25 per halving). Bounds at R=32: 1.5x the measured error; the
    R=16 -> 32 ratio must stay under 0.35 (measured 0.24-0.25)."""
    errors = {}
    for resolution in (16, 32):
        vertices, faces = extract(TetGrid.cube(resolution), sdf)
        mesh = as_trimesh(vertices, faces)
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
        errors[resolution] = (abs(mesh.volume - volume) / volume, abs(mesh.area - area) / area)
    assert errors[32][0] < volume_tol and errors[32][1] < area_tol
    assert errors[32][0] < 0.35 * errors[16][0] and errors[32][1] < 0.35 * errors[16][1]


def blobs(p: torch.Tensor) -> torch.Tensor:
    """Union of overlapping spheres plus a separate one: several components, saddles, thin necks."""
    centers = torch.tensor([[0.0, 0.0, 0.0], [0.35, 0.1, 0.0], [-0.2, 0.3, 0.2], [0.6, -0.6, 0.5]]).to(p)
    radii = torch.tensor([0.3, 0.22, 0.18, 0.15]).to(p)
    return ((p[:, None] - centers).norm(dim=-1) - radii).min(dim=1).values


@pytest.mark.parametrize("deform_scale", [0.0, 0.15, 1.0])
def test_mesh_is_watertight_outward_and_shares_vertices(deform_scale):
    """Also with offsets saturated at random signs, up to one cell (threestudio's bound, where tetrahedra can
    invert): connectivity comes from the lattice, so the mesh stays closed and consistently wound."""
    grid = TetGrid.fit((-0.5, -0.8, -0.3), (0.8, 0.5, 0.7), resolution=24)
    generator = torch.Generator().manual_seed(0)
    deformed = deform_scale > 0
    deformation = torch.randn(grid.num_vertices, 3, generator=generator) * 3 if deformed else None
    max_offset = deform_scale * grid.cell_size
    vertices, faces = extract(grid, blobs, deformation, max_offset)
    assert vertices.dtype == torch.float32 and faces.dtype == torch.int64
    mesh = as_trimesh(vertices, faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward
    parts = mesh.split(only_watertight=False)
    assert len(parts) == 2 and all(part.volume > 0 for part in parts)
    # One vertex per crossing edge, each used; no two vertices at the same place (shared, not duplicated).
    inside = grid.lattice(blobs(grid.vertices()) < 0)
    assert len(vertices) == int(grid.crossing_edges(inside).sum())
    assert torch.equal(torch.unique(faces), torch.arange(len(vertices)))
    assert len(np.unique(vertices.numpy().round(6), axis=0)) == len(vertices)
    if deformed:  # vertices moved, but by no more than the offset bound at each edge end
        plain, _ = extract(grid, blobs)
        moved = (vertices - plain).norm(dim=1)
        assert moved.max() > 0.1 * max_offset and moved.max() <= np.sqrt(3) * max_offset + 1e-6


def test_gradients_match_finite_differences():
    """Vertex positions are smooth in the SDF and offsets while no sign changes: gradcheck (float64) of
    the vertex positions w.r.t. both on a 3^3-cell grid with |sdf| >= 0.1 cell (eps 1e-6 flips nothing)."""
    grid = TetGrid.cube(3, bound=1.0)
    g = torch.Generator().manual_seed(1)
    base = sphere_sdf(0.6)(grid.vertices(dtype=torch.float64))
    bump = (torch.rand(grid.num_vertices, generator=g, dtype=torch.float64) - 0.5) * 0.2 * grid.cell_size
    sdf = base + bump
    sdf = torch.where(sdf.abs() < 0.1 * grid.cell_size, sdf.sign() * 0.1 * grid.cell_size, sdf).requires_grad_(True)
    deformation = torch.randn(grid.num_vertices, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    vertices, faces = marching_tetrahedra(grid, sdf, deformation, 0.15 * grid.cell_size)
    assert len(faces) > 0
    torch.autograd.gradcheck(lambda s, d: marching_tetrahedra(grid, s, d, 0.15 * grid.cell_size)[0],
                             (sdf, deformation), eps=1e-6, atol=1e-7, fast_mode=True)
    # And a loss through the geometry module reaches both parameters.
    geometry = DMTetGeometry(grid)
    geometry.set_sdf(sdf.detach().float())
    v, _ = geometry.extract()
    (v ** 2).sum().backward()
    assert geometry.sdf.grad.abs().sum() > 0 and geometry.deformation.grad.abs().sum() > 0


@pytest.mark.parametrize("value", [1.0, -1.0])
def test_no_sign_change_gives_an_empty_mesh(value):
    grid = TetGrid.cube(4)
    sdf = torch.full((grid.num_vertices,), value, requires_grad=True)
    vertices, faces = marching_tetrahedra(grid, sdf, torch.zeros(grid.num_vertices, 3), 0.1)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64
    assert sign_flip_loss(grid, sdf).item() == 0.0
    assert normal_consistency(vertices, faces).item() == 0.0 and laplacian_smoothing(vertices, faces).item() == 0.0
    # A fresh geometry starts empty, and an all-inside SDF is closed off at the box: never an open mesh.
    geometry = DMTetGeometry(grid)
    assert geometry.extract()[1].shape == (0, 3)
    geometry.set_sdf(torch.full((grid.num_vertices,), -1.0))
    v, f = geometry.extract()
    assert len(f) > 0 and as_trimesh(v, f).is_watertight


@pytest.mark.cuda
def test_cuda_matches_cpu():
    grid = TetGrid.cube(32)
    sdf = blobs(grid.vertices())
    deformation = torch.randn(grid.num_vertices, 3)
    v_cpu, f_cpu = marching_tetrahedra(grid, sdf, deformation, 0.1 * grid.cell_size)
    v_gpu, f_gpu = marching_tetrahedra(grid, sdf.cuda(), deformation.cuda(), 0.1 * grid.cell_size)
    assert torch.equal(f_gpu.cpu(), f_cpu)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-6, rtol=0)


# ---- geometry: initialisation, regulariser, state ----------------------------------------------------

def test_from_density_recovers_the_ball():
    """Soft ball r=0.5 (sigmoid edge width 0.01, level at half peak), R=32 cells over its tight box
    (cell 0.0393): measured max |r - 0.5| = 0.0109 (0.28 cell; linear interpolation of a steep sigmoid),
    mean r = 0.49983, volume-equivalent radius 0.49951 (on the full cube, cell 0.0625: 0.0256 = 0.41 cell,
    0.49903, 0.49816). Bounds: 0.4 cell, 1e-3 and 1e-3. SDF at the centre: -0.480 (distance less half a cell)."""
    geometry = DMTetGeometry.from_density(soft_sphere(0.5), level=25.0, bound=1.0, resolution=32, progress=False)
    h = geometry.grid.cell_size
    assert h < 2.0 / 32 * 0.7  # the tight box spends the cells on the object
    vertices, faces = geometry.extract()
    radius = vertices.detach().norm(dim=1)
    assert (radius - 0.5).abs().max() < 0.4 * h
    assert abs(radius.mean().item() - 0.5) < 1e-3
    mesh = as_trimesh(vertices, faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert abs((3 * mesh.volume / (4 * np.pi)) ** (1 / 3) - 0.5) < 1e-3
    # The SDF is a distance in scene units: the centre is about 0.5 inside, the corners outside by their distance.
    sdf = geometry.sdf.detach()
    centre = geometry.grid.vertices().norm(dim=1).argmin()
    assert sdf[centre].item() == pytest.approx(-0.5, abs=h)
    corner = geometry.grid.vertices()[-1]
    assert sdf[-1].item() == pytest.approx(corner.norm().item() - 0.5, abs=h)


def test_from_density_fills_cavities_and_drops_floaters_like_the_export():
    """A ball with an enclosed hollow and a small separate blob: the coarse export keeps only the ball's
    outer shell, and so must the fine stage's start."""
    ball, hollow, floater = soft_sphere(0.45), soft_sphere(0.2), soft_sphere(0.06, center=(0.7, 0.7, 0.7))
    density = lambda p: ball(p) - hollow(p) + floater(p)  # noqa: E731
    geometry = DMTetGeometry.from_density(density, level=25.0, resolution=32, tight=False, progress=False)
    mesh = as_trimesh(*geometry.extract())
    assert len(mesh.split(only_watertight=False)) == 1
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.45 ** 3, rel=0.03)
    kept = DMTetGeometry.from_density(density, level=25.0, resolution=32, tight=False, fill_cavities=False,
                                      keep_components=0.0, progress=False)
    assert len(as_trimesh(*kept.extract()).split(only_watertight=False)) == 3


def test_from_density_rejects_an_empty_field():
    with pytest.raises(UserError, match="no density above"):
        DMTetGeometry.from_density(soft_sphere(0.5), level=60.0, resolution=8, progress=False)
    with pytest.raises(UserError, match="level"):
        DMTetGeometry.from_density(soft_sphere(0.5), level=-1.0, resolution=8, progress=False)


def test_sign_flip_loss_matches_explicit_edges():
    grid = TetGrid((3, 4, 5), cell_size=0.4)
    sdf = (torch.randn(grid.num_vertices, generator=torch.Generator().manual_seed(2)) * 0.5).requires_grad_(True)
    edges = grid.edges()
    a, b = sdf[edges[:, 0]], sdf[edges[:, 1]]
    flip = (a >= 0) != (b >= 0)
    a, b = a[flip], b[flip]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(a, (b >= 0).float()) + bce(b, (a >= 0).float())
    got = sign_flip_loss(grid, sdf)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert sdf.grad.abs().sum() > 0


def test_state_dict_round_trip_rebuilds_the_grid():
    grid = TetGrid.fit((-0.4, -0.3, -0.5), (0.4, 0.3, 0.5), resolution=12)
    geometry = DMTetGeometry.from_sdf(sphere_sdf(0.3), grid)
    with torch.no_grad():
        geometry.deformation.normal_()
    restored = DMTetGeometry.from_state_dict(geometry.state_dict())
    assert restored.grid.cells == grid.cells and restored.grid.cell_size == pytest.approx(grid.cell_size)
    for a, b in zip(geometry.extract(), restored.extract()):
        assert torch.equal(a, b)


# ---- mesh regularisers -------------------------------------------------------------------------------

def test_normal_consistency_is_one_minus_cos_of_the_fold():
    """Two triangles sharing edge (0, 1), folded by theta about it: the loss is 1 - cos(theta)."""
    for theta in (0.0, 0.3, 1.2):
        vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -np.cos(theta), np.sin(theta)]],
                                dtype=torch.float64)
        faces = torch.tensor([[0, 1, 2], [1, 0, 3]])
        assert normal_consistency(vertices, faces).item() == pytest.approx(1 - np.cos(theta), abs=1e-12)
    # A closed polyhedron averages over its edges: a cube's 18 edges = 12 at 90 degrees + 6 flat diagonals.
    box = trimesh.creation.box()
    loss = normal_consistency(torch.tensor(box.vertices), torch.tensor(box.faces))
    assert loss.item() == pytest.approx(12 / 18, abs=1e-12)


def test_laplacian_smoothing_measures_distance_to_neighbour_mean():
    """A fan of 6 triangles around a centre raised by z: the centre is z from its ring's mean; each ring
    vertex (3 neighbours: centre and two ring neighbours) is off by a known amount."""
    ring = torch.tensor([[np.cos(a), np.sin(a), 0.0] for a in np.arange(6) * np.pi / 3], dtype=torch.float64)
    z = 0.3
    vertices = torch.cat([torch.tensor([[0.0, 0.0, z]], dtype=torch.float64), ring]).requires_grad_(True)
    faces = torch.tensor([[0, 1 + i, 1 + (i + 1) % 6] for i in range(6)])
    # Ring vertex k: neighbours are the centre and k +- 1; their mean minus the vertex.
    expected_ring = (torch.stack([(vertices[0] + ring[(k - 1) % 6] + ring[(k + 1) % 6]) / 3 - ring[k]
                                  for k in range(6)]).norm(dim=1))
    expected = (z + expected_ring.sum()) / 7
    loss = laplacian_smoothing(vertices, faces)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    loss.backward()
    assert vertices.grad[0, 2] > 0  # lowering the centre towards its ring reduces the loss
    # Smoothing a marching-tetrahedra sphere: a finer mesh is smoother by both measures.
    coarse, fine = (extract(TetGrid.cube(r), sphere_sdf(0.5)) for r in (16, 32))
    assert normal_consistency(*fine) < normal_consistency(*coarse)
    assert laplacian_smoothing(*fine) < laplacian_smoothing(*coarse)
