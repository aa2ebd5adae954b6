"""The PyTorch mesh rasterizer against closed forms: which pixel centres a triangle covers, shared edges
covered once, depth order, perspective-correct barycentrics, near-plane clipping; and its gradients against
finite differences (interpolate in attributes and positions, antialias in positions on a silhouette)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from threed.errors import UserError
from threed.render.rasterize import (MeshRasterizer, antialias, edge_topology, interpolate, rasterize,
                                     visible_triangles)


def clip_from_ndc(xy, z=0.0, w=1.0) -> torch.Tensor:
    """Clip-space positions (V, 4) that project to NDC `xy` (V, 2) at depth z/w = `z` with homogeneous `w`."""
    xy = torch.as_tensor(xy, dtype=torch.float64)
    n = len(xy)
    z = torch.as_tensor(z, dtype=torch.float64).expand(n)
    w = torch.as_tensor(w, dtype=torch.float64).expand(n)
    return torch.stack([xy[:, 0] * w, xy[:, 1] * w, z * w, w], -1)


def centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """NDC (x, y) of every pixel centre, (H, W) each; row 0 is y = -1 (nvdiffrast's convention)."""
    x = (2 * np.arange(w) + 1) / w - 1
    y = (2 * np.arange(h) + 1) / h - 1
    return np.meshgrid(x, y, indexing="xy")


def edge_values(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(K, H, W) signed distances (NDC) of points to the edges of a convex polygon, positive inside."""
    poly = np.asarray(poly, dtype=np.float64)
    area = 0.5 * np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    out = []
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        d = b - a
        out.append(np.sign(area) * (d[0] * (y - a[1]) - d[1] * (x - a[0])) / np.hypot(*d))
    return np.stack(out)


def covered(rast: torch.Tensor) -> np.ndarray:
    return (rast[0, ..., 3] > 0).numpy()


# -- coverage -----------------------------------------------------------------------------------------------
def test_triangle_covers_exactly_the_pixel_centres_inside_it():
    h, w = 40, 56
    xy = np.array([[-0.83, -0.61], [0.77, -0.29], [-0.12, 0.87]])
    x, y = centres(h, w)
    dist = edge_values(xy, x, y)
    assert np.abs(dist).min() > 1e-5  # no centre on an edge: the expected set is unambiguous
    expected = (dist > 0).all(0)
    # different w per vertex (same projection) and both windings: coverage is a property of the projection
    for order in ([0, 1, 2], [0, 2, 1]):
        pos = clip_from_ndc(xy[order], z=0.3, w=torch.tensor([1.0, 2.5, 0.4]))
        rast = rasterize(pos, torch.tensor([[0, 1, 2]]), (h, w))
        assert (covered(rast) == expected).all()
        assert expected.sum() > 300
        assert (rast[0][~torch.from_numpy(expected)] == 0).all()  # background: all four channels zero


def test_square_of_two_triangles_shares_its_diagonal_exactly_once():
    """The diagonal of a full-screen square passes through pixel centres (i, i): each centre is covered by
    exactly one of the two triangles, rendered separately, so none is lost or drawn twice."""
    h = w = 32
    pos = clip_from_ndc([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    count = sum(covered(rasterize(pos, tris[i:i + 1], (h, w))).astype(int) for i in range(2))
    assert (count == 1).all()
    both = rasterize(pos, tris, (h, w))
    ids = both[0, ..., 3].numpy()
    assert set(np.unique(ids)) == {1.0, 2.0}
    assert (ids[np.arange(h), np.arange(w)] > 0).all()


@pytest.mark.parametrize("spokes", [8, 13])
def test_fan_covers_every_inside_centre_once(spokes):
    """A disc-like polygon split into a fan around a vertex sitting on a pixel centre. With 8 spokes along
    the axes and diagonals, every spoke and the outer edges run through pixel centres (the tie rule decides
    them all); with 13 irregular spokes, they do not. Centres strictly inside are covered exactly once,
    centres strictly outside never, centres on the outline at most once."""
    h = w = 32
    c = np.array([(2 * 16 + 1) / w - 1, (2 * 15 + 1) / h - 1])  # centre of pixel (16, 15)
    px = 2.0 / w  # one pixel in NDC
    if spokes == 8:
        dirs = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
        ring = np.array([c + 6 * px * np.array(d) for d in dirs])
    else:
        ang = np.sort(np.random.default_rng(3).uniform(0, 2 * np.pi, spokes))
        rad = np.random.default_rng(4).uniform(6, 12, spokes) * px
        ring = c + np.stack([np.cos(ang), np.sin(ang)], -1) * rad[:, None]
    pos = clip_from_ndc(np.concatenate([c[None], ring]))
    tris = torch.tensor([[0, 1 + i, 1 + (i + 1) % spokes] for i in range(spokes)])
    count = sum(covered(rasterize(pos, tris[i:i + 1], (h, w))).astype(int) for i in range(spokes))
    x, y = centres(h, w)
    dist = edge_values(ring, x, y).min(0)  # the polygon is convex with 8 spokes; star-shaped with 13
    if spokes == 8:
        inside, outside = dist > 1e-9, dist < -1e-9
    else:  # star-shaped: inside when inside one of the fan's triangles
        d = np.stack([edge_values(pos[t, :2].numpy(), x, y).min(0) for t in tris.numpy()])
        inside, outside = (d > 1e-9).any(0), (d < -1e-9).all(0)
    assert (count[inside] == 1).all()
    assert (count[outside] == 0).all()
    assert (count <= 1).all()
    assert count[15, 16] == 1  # the shared vertex itself


def test_nearer_triangle_wins_whatever_the_order():
    h = w = 24
    a = clip_from_ndc([[-0.93, -0.91], [0.88, -0.79], [-0.71, 0.87]], z=0.2)
    b = clip_from_ndc([[0.91, 0.89], [-0.83, 0.69], [0.61, -0.87]], z=-0.4)  # nearer (smaller z/w)
    pos = torch.cat([a, b])
    x, y = centres(h, w)
    in_a = (edge_values(a[:, :2].numpy(), x, y) > 0).all(0)
    in_b = (edge_values(b[:, :2].numpy(), x, y) > 0).all(0)
    assert min(np.abs(edge_values(t[:, :2].numpy(), x, y)).min() for t in (a, b)) > 1e-6
    assert (in_a & in_b).sum() > 20
    for tris, id_a, id_b in ((torch.tensor([[0, 1, 2], [3, 4, 5]]), 1, 2),
                             (torch.tensor([[3, 4, 5], [0, 1, 2]]), 2, 1)):
        rast = rasterize(pos, tris, (h, w))[0]
        ids = rast[..., 3].numpy()
        assert (ids[in_b] == id_b).all()
        assert (ids[in_a & ~in_b] == id_a).all()
        assert np.allclose(rast[..., 2].numpy()[in_b], -0.4)
        assert np.allclose(rast[..., 2].numpy()[in_a & ~in_b], 0.2)


def test_perspective_correct_barycentrics_and_depth_match_closed_form():
    """u, v are perspective-correct: with screen-space barycentrics l_i of the pixel centre in the projected
    triangle, b_i = (l_i / w_i) / sum_j (l_j / w_j); z/w is affine in screen space: sum_i l_i z_i / w_i."""
    h, w = 20, 28
    ndc = np.array([[-0.9, -0.7], [0.85, -0.5], [0.1, 0.9]])
    wv = np.array([0.7, 3.0, 1.6])
    zw = np.array([-0.3, 0.5, 0.9])
    pos = clip_from_ndc(ndc, z=torch.from_numpy(zw), w=torch.from_numpy(wv))
    rast = rasterize(pos, torch.tensor([[0, 1, 2]]), (h, w))[0].numpy()
    x, y = centres(h, w)
    t = np.c_[ndc, np.ones(3)].T  # columns are the projected vertices
    lam = np.linalg.solve(t, np.stack([x.ravel(), y.ravel(), np.ones(x.size)])).T.reshape(h, w, 3)
    inside = (lam > 0).all(-1)
    assert inside.sum() > 150
    persp = lam / wv
    b = persp / persp.sum(-1, keepdims=True)
    np.testing.assert_allclose(rast[..., 0][inside], b[..., 0][inside], atol=1e-12)
    np.testing.assert_allclose(rast[..., 1][inside], b[..., 1][inside], atol=1e-12)
    np.testing.assert_allclose(rast[..., 2][inside], (lam @ zw)[inside], atol=1e-12)
    assert not np.allclose(b[inside], lam[inside], atol=1e-2)  # the correction matters here


def _clip_polygon(poly: np.ndarray, plane) -> np.ndarray:
    """Sutherland-Hodgman: the part of a clip-space polygon (K, 4) where plane(p) >= 0."""
    out = []
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        da, db = plane(a), plane(b)
        if da >= 0:
            out.append(a)
        if (da >= 0) != (db >= 0):
            out.append(a + da / (da - db) * (b - a))
    return np.array(out)


@pytest.mark.parametrize("case", ["near", "behind_camera"])
def test_clipping_matches_the_geometrically_clipped_triangle(case):
    """A triangle crossing the near plane (and, in the second case, the camera plane w = 0) covers the pixel
    centres inside its part with -w <= z <= w, found here by clipping the polygon and projecting it."""
    h = w = 32
    if case == "near":
        v = np.array([[-0.5, -0.4, 0.9, 1.0], [0.6, -0.3, 2.5, 3.0], [0.1, 1.3, -2.2, 1.5]])
    else:
        v = np.array([[-0.6, -0.5, 0.3, 1.0], [0.7, -0.4, 0.1, 1.1], [0.5, 0.8, -0.2, -0.4]])  # w < 0
    poly = _clip_polygon(_clip_polygon(v, lambda p: p[2] + p[3]), lambda p: p[3] - p[2])
    proj = poly[:, :2] / poly[:, 3:]
    x, y = centres(h, w)
    dist = edge_values(proj, x, y)
    assert np.abs(dist).min() > 1e-6
    expected = (dist > 0).all(0)
    assert 30 < expected.sum() < h * w - 30
    rast = rasterize(torch.from_numpy(v), torch.tensor([[0, 1, 2]]), (h, w))
    assert (covered(rast) == expected).all()
    zw = rast[0, ..., 2].numpy()[expected]
    assert (zw >= -1).all() and (zw <= 1).all()


def test_nothing_drawn_behind_the_camera_beyond_the_far_plane_or_for_no_faces():
    xy = [[-0.5, -0.5], [0.5, -0.5], [0.0, 0.5]]
    behind = clip_from_ndc(xy, z=0.0, w=-1.0)  # the same projection, w < 0
    beyond = clip_from_ndc(xy, z=1.2, w=1.0)
    front = clip_from_ndc(xy, z=0.0, w=1.0)
    tri = torch.tensor([[0, 1, 2]])
    assert (rasterize(behind, tri, (16, 16)) == 0).all()
    assert (rasterize(beyond, tri, (16, 16)) == 0).all()
    assert covered(rasterize(front, tri, (16, 16))).sum() > 20
    none = torch.zeros(0, 3, dtype=torch.long)  # an empty mesh (e.g. an SDF without a zero crossing)
    rast = rasterize(front, none, (16, 16))
    image = antialias(interpolate(torch.ones(3, 3), rast, none), rast, front, none)
    assert (rast == 0).all() and (image == 0).all()


def test_batch_and_chunking_give_the_same_image():
    """Each batch entry renders (and interpolates and antialiases) as if alone, and tiny chunks (forcing
    many passes) change nothing."""
    g = torch.Generator().manual_seed(0)
    nv, nf = 60, 40
    pos = torch.cat([torch.rand(2, nv, 2, generator=g) * 2.4 - 1.2, torch.rand(2, nv, 1, generator=g) * 1.6 - 0.8,
                     torch.rand(2, nv, 1, generator=g) + 0.5], -1)
    pos[..., :3] *= pos[..., 3:]
    tri = torch.randint(0, nv, (nf, 3), generator=g)
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])]
    attr = torch.rand(2, nv, 3, generator=g)
    both = rasterize(pos, tri, (24, 32))
    image = antialias(interpolate(attr, both, tri), both, pos, tri)
    for b in range(2):
        one = rasterize(pos[b], tri, (24, 32))
        assert torch.equal(both[b], one[0])
        assert torch.allclose(image[b], antialias(interpolate(attr[b], one, tri), one, pos[b], tri)[0])
    assert torch.equal(visible_triangles(pos, tri, (24, 32), chunk=1), visible_triangles(pos, tri, (24, 32)))
    assert (both[..., 3] > 0).float().mean() > 0.5


# -- gradients ----------------------------------------------------------------------------------------------
def _mesh_scene():
    """Two triangles sharing an edge, with perspective (w differs per vertex), float64."""
    ndc = np.array([[-0.8, -0.7], [0.75, -0.55], [0.05, 0.8], [0.85, 0.6]])
    pos = clip_from_ndc(ndc, z=torch.tensor([0.1, -0.2, 0.3, 0.0]), w=torch.tensor([1.0, 2.0, 0.6, 1.3]))
    return pos, torch.tensor([[0, 1, 2], [1, 3, 2]]), ndc


def _min_centre_distance(ndc: np.ndarray, tris: torch.Tensor, h: int, w: int) -> float:
    x, y = centres(h, w)
    return min(np.abs(edge_values(ndc[t], x, y)).min() for t in tris.numpy())


def test_interpolate_gradients_match_finite_differences():
    """torch.autograd.gradcheck (central differences, eps 1e-6, float64) of interpolate w.r.t. the
    attributes and w.r.t. the clip-space positions through the barycentrics. No pixel centre is within 1e-4
    of an edge, so the 1e-6 perturbations never change which triangle covers a pixel."""
    h, w = 12, 14
    pos, tri, ndc = _mesh_scene()
    assert _min_centre_distance(ndc, tri, h, w) > 1e-4
    attr = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rast = rasterize(pos, tri, (h, w))
    assert torch.autograd.gradcheck(lambda a: interpolate(a, rast, tri), (attr.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda p: interpolate(attr, rasterize(p, tri, (h, w)), tri),
                                    (pos.clone().requires_grad_(),))


def _silhouette_margin(ndc: np.ndarray, h: int, w: int) -> float:
    """Smallest distance (pixels) from an edge crossing of a row (column) of pixel centres to a pixel centre or
    to a midpoint between two: where antialias switches pixels or clamps, so where it has kinks."""
    worst = math.inf
    s = np.stack([(ndc[:, 0] + 1) * w / 2, (ndc[:, 1] + 1) * h / 2], -1)
    for a, b in zip(s, np.roll(s, -1, axis=0)):
        for axis, n in ((0, h), (1, w)):  # rows of centres cross at x; columns at y
            o = 1 - axis
            lines = np.arange(n) + 0.5
            tt = (lines - a[o]) / (b[o] - a[o]) if b[o] != a[o] else np.array([])
            cross = a[axis] + tt[(tt > 0) & (tt < 1)] * (b[axis] - a[axis])
            if cross.size:
                frac = (cross - 0.5) * 2  # centres at even, midpoints at odd values
                worst = min(worst, (np.abs(frac - np.round(frac)) / 2).min())
    return worst


def test_antialias_position_gradients_match_finite_differences():
    """The gradient of sum(weight * antialias(colour)) w.r.t. every position coordinate against central
    differences of that sum, in float64. Colours are interpolated from vertex attributes (so they move too)
    and the weighting is smooth. Step 1e-6 in clip units (~1e-5 pixels): the geometry keeps every edge
    crossing >= 0.01 pixels away from a pixel centre or midpoint (where antialias has kinks), so no step
    crosses one (measured difference 2e-10 of the largest entry, 159; 1e-8 with a 100 times larger step);
    tolerance 1e-6 of the largest entry leaves room for round-off only. The silhouette does produce a gradient: without
    antialias the same loss with constant colours has a zero position gradient."""
    h, w = 24, 24
    ndc = np.array([[-0.663, -0.603], [0.698, -0.332], [-0.007, 0.727]])
    assert _silhouette_margin(ndc, h, w) > 0.01
    pos = clip_from_ndc(ndc, z=0.1, w=torch.tensor([1.0, 1.7, 0.8]))
    tri = torch.tensor([[0, 1, 2]])
    attr = torch.tensor([[1.0, 0.2], [0.4, 0.9], [0.7, 0.5]], dtype=torch.float64)
    x, y = centres(h, w)
    weight = torch.from_numpy(1.0 + 0.5 * np.sin(3 * x + 1) * np.cos(2 * y))[None, :, :, None]

    def loss(p: torch.Tensor, colours: torch.Tensor = attr) -> torch.Tensor:
        rast = rasterize(p, tri, (h, w))
        return (weight * antialias(interpolate(colours, rast, tri), rast, p, tri)).sum()

    p = pos.clone().requires_grad_()
    loss(p).backward()
    grad = p.grad
    step = 1e-6
    fd = torch.zeros_like(pos)
    for i in range(3):
        for c in range(4):
            d = torch.zeros_like(pos)
            d[i, c] = step
            fd[i, c] = (loss(pos + d) - loss(pos - d)) / (2 * step)
    scale = grad.abs().max()
    assert scale > 1.0
    assert (grad - fd).abs().max() < 1e-6 * scale

    flat = torch.ones(3, 2, dtype=torch.float64)
    p = pos.clone().requires_grad_()
    rast = rasterize(p, tri, (h, w))
    (weight * interpolate(flat, rast, tri)).sum().backward()
    assert p.grad.abs().max() == 0  # constant colour: no gradient without antialias
    p.grad = None
    loss(p, flat).backward()
    assert p.grad[:, :2].abs().max() > 1.0


def test_antialias_gradient_approximates_the_area_derivative():
    """For a uniformly coloured triangle over black, sum(antialias(image)) approximates the triangle's area
    in pixels, and its position gradient the analytic derivative of that area (1/2 the perpendicular of the
    opposite edge per vertex). Measured on this triangle at 64 x 64 (2 cores, float64): area 811.93 px, sum
    811.81; gradient error |g - g_area| / |g_area| = 0.031. Bounds: 0.5 px on the area, 0.06 on the gradient
    (about twice the measured error: the per-pair edge model misses corners)."""
    h = w = 64
    ndc = torch.tensor([[-0.63, -0.52], [0.71, -0.31], [0.05, 0.77]], dtype=torch.float64)
    pos = clip_from_ndc(ndc).requires_grad_()
    tri = torch.tensor([[0, 1, 2]])
    rast = rasterize(pos, tri, (h, w))
    image = antialias((rast[..., 3:] > 0).double(), rast, pos, tri)
    image.sum().backward()
    scr = torch.stack([(ndc[:, 0] + 1) * w / 2, (ndc[:, 1] + 1) * h / 2], -1).requires_grad_()
    e1, e2 = scr[1] - scr[0], scr[2] - scr[0]
    area = 0.5 * (e1[0] * e2[1] - e2[0] * e1[1]).abs()
    area.backward()
    g_area = scr.grad * torch.tensor([w / 2, h / 2], dtype=torch.float64)  # d/d(NDC) = d/d(pixels) * W/2
    assert abs(image.sum().item() - area.item()) < 0.5
    err = ((pos.grad[:, :2] - g_area).norm() / g_area.norm()).item()
    assert err < 0.06


def test_antialias_blends_across_silhouettes_only():
    """An edge shared by two triangles is a silhouette only where one folds behind the other. Flat: the
    diagonal of a square split in two, the two halves in different colours, stays sharp. Folded: a triangle
    with a neighbour folded back behind it is antialiased along the shared edge exactly as if it were alone."""
    h = w = 32
    id_colour = lambda rast: torch.stack([rast[..., 3] == 1, rast[..., 3] == 2], -1).double()  # noqa: E731
    pos = clip_from_ndc([[-0.9, -0.8], [0.85, -0.9], [0.8, 0.9], [-0.85, 0.8]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(pos, tri, (h, w))
    colour = id_colour(rast)
    out = antialias(colour, rast, pos, tri)
    changed = (out != colour).any(-1)[0]
    ids = rast[0, ..., 3]
    diagonal = torch.zeros_like(changed)
    diagonal[:, :-1] |= (ids[:, :-1] != ids[:, 1:]) & (ids[:, :-1] > 0) & (ids[:, 1:] > 0)
    diagonal[:-1, :] |= (ids[:-1, :] != ids[1:, :]) & (ids[:-1, :] > 0) & (ids[1:, :] > 0)
    inner = torch.zeros_like(changed)
    inner[4:-4, 4:-4] = True  # away from the square's outline, which is antialiased
    assert (diagonal & inner).sum() > 20
    assert not (changed & diagonal & inner).any()
    assert changed.sum() > 40  # the outline is

    front = clip_from_ndc([[-0.8, -0.7], [0.75, -0.55], [0.05, 0.8]], z=0.0)
    back = clip_from_ndc([[-0.2, 0.0]], z=0.5)  # projects inside the front triangle, further away
    pos = torch.cat([front, back])
    folded = torch.tensor([[0, 1, 2], [2, 1, 3]])  # shares edge (1, 2), consistent winding
    r_fold = rasterize(pos, folded, (h, w))
    r_alone = rasterize(front, folded[:1], (h, w))
    assert torch.equal(r_fold[..., 3], r_alone[..., 3])  # the folded triangle is hidden
    out_fold = antialias(id_colour(r_fold), r_fold, pos, folded)
    out_alone = antialias(id_colour(r_alone), r_alone, front, folded[:1])
    assert (out_alone != id_colour(r_alone)).any(-1).sum() > 40
    assert torch.equal(out_fold, out_alone)


def test_antialias_moves_a_box_toward_its_supersampled_image():
    """A box (12 faces, colours from positions) in perspective at 48 x 48, against the mean of 6 x 6
    samples per pixel. Measured (float64, CPU): L1 error 34.6 aliased, 5.8 antialiased (ratio 0.17; 0.16 to
    0.23 at 32 to 64 px with 4 to 8 samples a side). Bound: ratio < 0.3. With small triangles at the contour (a finely tessellated sphere) the gain
    is much smaller, as the pair analysis only sees the covering triangle's own edges (see antialias)."""
    corners = torch.tensor([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=torch.float64)
    v = corners * torch.tensor([0.4, 0.3, 0.35], dtype=torch.float64)
    f = torch.tensor([[1, 3, 0], [4, 1, 0], [0, 3, 2], [2, 4, 0], [1, 7, 3], [5, 1, 4], [5, 7, 1], [3, 7, 2],
                      [6, 4, 2], [2, 7, 6], [6, 5, 4], [7, 5, 6]])  # outward-facing, consistently wound
    t, near, far = 1 / math.tan(math.radians(22.5)), 0.1, 10.0
    proj = torch.tensor([[t, 0, 0, 0], [0, t, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)], [0, 0, -1, 0]],
                        dtype=torch.float64)
    view = torch.eye(4, dtype=torch.float64)
    view[2, 3] = -2.2
    cy, sy, cx, sx = math.cos(0.6), math.sin(0.6), math.cos(0.4), math.sin(0.4)
    ry = torch.tensor([[cy, 0, sy, 0], [0, 1, 0, 0], [-sy, 0, cy, 0], [0, 0, 0, 1]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0, 0], [0, cx, -sx, 0], [0, sx, cx, 0], [0, 0, 0, 1]], dtype=torch.float64)
    pos = torch.cat([v, torch.ones(8, 1, dtype=torch.float64)], 1) @ (proj @ view @ rx @ ry).T
    colours = 0.5 + 0.5 * v / 0.4
    h, s = 48, 6
    rast = rasterize(pos, f, (h, h))
    image = interpolate(colours, rast, f)
    fine = rasterize(pos, f, (h * s, h * s))
    reference = interpolate(colours, fine, f).view(1, h, s, h, s, 3).mean((2, 4))
    aliased = (image - reference).abs().sum()
    smoothed = (antialias(image, rast, pos, f) - reference).abs().sum()
    assert aliased > 20
    assert smoothed < 0.3 * aliased


def test_fitting_a_triangle_to_a_silhouette_with_antialias_gradients():
    """Adam (lr 0.01, 100 steps) on the NDC vertex positions of a triangle, loss = MSE between its antialiased
    silhouette and a target triangle's at 48 x 48: only antialias gives this loss a gradient. Measured
    (float32, 2 shared cores): hard-mask IoU 0.12 at the start, 0.995 after 100 steps, largest vertex error
    0.0033 NDC (0.08 px). Bounds: IoU > 0.97 (half a pixel off along one edge costs ~0.04 here) and vertex
    error < 0.01 NDC (0.12 px, three times the measured error)."""
    h = w = 48
    tri = torch.tensor([[0, 1, 2]])
    target_ndc = torch.tensor([[-0.6, -0.5], [0.7, -0.2], [-0.1, 0.75]])
    target_pos = clip_from_ndc(target_ndc).float()
    t_rast = rasterize(target_pos, tri, (h, w))
    target = antialias((t_rast[..., 3:] > 0).float(), t_rast, target_pos, tri)
    xy = torch.tensor([[-0.3, -0.7], [0.4, -0.6], [0.3, 0.2]], requires_grad=True)
    opt = torch.optim.Adam([xy], lr=0.01)

    def iou() -> float:
        with torch.no_grad():
            mask = rasterize(clip_from_ndc(xy).float(), tri, (h, w))[0, ..., 3] > 0
        ref = t_rast[0, ..., 3] > 0
        return ((mask & ref).sum() / (mask | ref).sum()).item()

    start = iou()
    for _ in range(100):
        pos = torch.cat([xy, torch.zeros(3, 1), torch.ones(3, 1)], -1)
        rast = rasterize(pos, tri, (h, w))
        image = antialias((rast[..., 3:] > 0).float(), rast, pos, tri)
        loss = ((image - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start < 0.2
    assert iou() > 0.97
    assert (xy.detach() - target_ndc).abs().max() < 0.01


# -- topology and backend -----------------------------------------------------------------------------------
def test_edge_topology_of_a_tetrahedron_and_of_open_or_nonmanifold_edges():
    tet = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]])
    topo = edge_topology(tet)
    missing = 6 - tet.sum(1)  # each edge's other face holds the fourth vertex
    assert torch.equal(topo, missing[:, None].expand(4, 3))
    assert (edge_topology(torch.tensor([[0, 1, 2]])) == -1).all()
    fan3 = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])  # edge (0, 1) in three faces: no single neighbour
    t3 = edge_topology(fan3)
    assert (t3[:, 2] == -1).all() and (t3[:, :2] == -1).all()


def test_mesh_rasterizer_picks_torch_on_cpu_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="threed.render.rasterize"):
        r = MeshRasterizer("auto", "cpu")
    assert r.backend == "torch"
    assert "backend: torch" in caplog.text
    with pytest.raises(UserError, match="nvdiffrast"):
        MeshRasterizer("nvdiffrast", "cpu")
    with pytest.raises(UserError, match="unknown"):
        MeshRasterizer("opengl", "cpu")  # type: ignore[arg-type]
    pos, tri, _ = _mesh_scene()
    rast = r.rasterize(pos, tri, (8, 8))
    assert torch.equal(rast, rasterize(pos, tri, (8, 8)))
    col = r.interpolate(torch.rand(4, 3, dtype=torch.float64), rast, tri)
    assert r.antialias(col, rast, pos, tri).shape == (1, 8, 8, 3)


# -- CUDA ----------------------------------------------------------------------------------------------------
def _sphere_scene(device: str, h: int = 256, w: int = 256):
    """An icosphere (20480 faces) seen in perspective, with colours from positions; float32 on `device`."""
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=5, radius=0.8)
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    v = v * torch.tensor([1.0, 0.7, 0.9])  # an ellipsoid: silhouettes at varied slopes
    f = torch.tensor(mesh.faces, dtype=torch.int64)
    fov, near, far, dist = math.radians(45), 0.1, 10.0, 2.6
    t = 1 / math.tan(fov / 2)
    a, b = -(far + near) / (far - near), -2 * far * near / (far - near)
    proj = torch.tensor([[t, 0, 0, 0], [0, t, 0, 0], [0, 0, a, b], [0, 0, -1, 0]])
    view = torch.eye(4)
    view[2, 3] = -dist
    rot = torch.tensor([[0.8, 0.0, 0.6, 0], [0.0, 1.0, 0.0, 0], [-0.6, 0.0, 0.8, 0], [0, 0, 0, 1]])
    pos = torch.cat([v, torch.ones(len(v), 1)], 1) @ (proj @ view @ rot).T
    return pos[None].to(device), f.to(device), (0.5 + 0.5 * v)[None].to(device), (h, w)


def _render(r: MeshRasterizer, pos, tri, attr, res):
    pos = pos.clone().requires_grad_()
    rast = r.rasterize(pos, tri, res)
    img = r.antialias(r.interpolate(attr, rast, tri), rast, pos, tri)
    weight = torch.linspace(0.5, 1.5, img.numel() // img.shape[-1], device=img.device).view(img.shape[:-1] + (1,))
    (img * weight).sum().backward()
    return rast.detach(), img.detach(), pos.grad


@pytest.mark.cuda
def test_torch_backend_on_cuda_matches_cpu():
    """Same ops, same IEEE float32 arithmetic: the ids should agree everywhere but for round-off ties;
    bounds: 99.9 % of pixels, colours and gradients to 1e-4 relative."""
    out = [_render(MeshRasterizer("torch", dev), *_sphere_scene(dev)) for dev in ("cpu", "cuda")]
    (rc, ic, gc), (rg, ig, gg) = [(a.cpu(), b.cpu(), c.cpu()) for a, b, c in out]
    same = rc[..., 3] == rg[..., 3]
    assert same.float().mean() > 0.999
    assert torch.allclose(rc[same], rg[same], atol=1e-5)
    assert (ic - ig).abs().mean() < 1e-4
    assert (gc - gg).norm() < 1e-3 * gc.norm()


@pytest.mark.cuda
def test_torch_backend_agrees_with_nvdiffrast():
    """nvdiffrast snaps vertices to a sub-pixel grid and has its own tie rules, so ids differ at a few edge
    pixels: bounds 99 % of pixels with equal ids, barycentrics within 1e-3 where they agree, antialiased
    images within 1e-2 mean absolute difference, position gradients with cosine similarity > 0.95."""
    pytest.importorskip("nvdiffrast.torch")
    scene = _sphere_scene("cuda")
    rt, it, gt = _render(MeshRasterizer("torch", "cuda"), *scene)
    rn, in_, gn = _render(MeshRasterizer("nvdiffrast", "cuda"), *scene)
    same = rt[..., 3] == rn[..., 3]
    assert same.float().mean() > 0.99
    assert (rt[..., :2][same] - rn[..., :2][same]).abs().max() < 1e-3
    assert (it - in_).abs().mean() < 1e-2
    cos = (gt * gn).sum() / (gt.norm() * gn.norm())
    assert cos > 0.95
