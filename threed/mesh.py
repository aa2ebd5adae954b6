"""Mesh extraction from a density field: sampled grid, marching cubes, clean-up, colours.

A NeRF has no surface, only a volume density. We sample it on a regular grid, take the level set at
a density threshold with marching cubes, drop small floating parts, optionally decimate, and colour
the vertices with the field's albedo. The threshold can be chosen automatically by making the
mesh's silhouettes agree with the field's rendered opacity (`auto_threshold`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threed.errors import UserError
from threed.progress import bar

DensityFn = Callable[[Tensor], Tensor]
AlbedoFn = Callable[[Tensor], Tensor]


@dataclass
class Mesh:
    vertices: np.ndarray  # (N, 3) float32, scene coordinates (y up, front +z)
    faces: np.ndarray  # (M, 3) int64, counter-clockwise seen from outside (outward normals)
    colors: np.ndarray | None = None  # (N, 3) float32 in [0, 1], vertex albedo
    normals: np.ndarray | None = None  # (N, 3) float32, unit length

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64).reshape(-1, 3)
        if self.colors is not None:
            self.colors = np.ascontiguousarray(np.clip(self.colors, 0.0, 1.0), dtype=np.float32).reshape(-1, 3)
        if self.normals is not None:
            self.normals = np.ascontiguousarray(self.normals, dtype=np.float32).reshape(-1, 3)
        for name in ("colors", "normals"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.vertices):
                raise ValueError(f"mesh has {len(self.vertices)} vertices but {len(value)} {name}")
        if len(self.faces) and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ValueError("mesh faces index vertices that do not exist")


def _lattice(bound: float, resolution: int) -> Tensor:
    return torch.linspace(-bound, bound, resolution, dtype=torch.float32)


@torch.no_grad()
def density_grid(density_fn: DensityFn, bound: float, resolution: int, device: str | torch.device,
                 chunk: int = 65536, progress: bool | None = False) -> Tensor:
    """Densities at the lattice linspace(-bound, bound, R)^3 as an (R, R, R) CPU tensor, [i, j, k] = x, y, z.

    Points are generated chunk by chunk from flat indices so a 256^3 grid never holds all its
    coordinates in memory at once. `progress`: a bar over the points (see threed.progress).
    """
    if resolution < 2:
        raise UserError(f"mesh resolution must be at least 2, got {resolution}: pass export.resolution=128 or more")
    axis = _lattice(bound, resolution).to(device)
    total = resolution ** 3
    out = torch.empty(total, dtype=torch.float32)
    with bar(f"density grid {resolution}^3", total, progress, unit="pt", unit_scale=True) as shown:
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total), device=device)
            i, rem = idx // (resolution * resolution), idx % (resolution * resolution)
            j, k = rem // resolution, rem % resolution
            points = torch.stack([axis[i], axis[j], axis[k]], dim=-1)
            out[start:start + len(idx)] = density_fn(points).reshape(-1).float().cpu()
            shown.update(len(idx))
    return out.reshape(resolution, resolution, resolution)


def _box_interval(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances of rays through the box [-bound, bound]^3 (slab method); exit <= entry on a miss."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-bound - origins) / safe, (bound - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    return near, far


@torch.no_grad()
def _ray_max_density(grid: Tensor, bound: float, origins: Tensor, dirs: Tensor, samples: int,
                     chunk: int = 4096, advance: Callable[[int], object] = lambda n: None) -> Tensor:
    """Largest trilinearly interpolated density along each ray inside the box; (N,) for (N, 3) rays."""
    # grid_sample reads (x, y, z) coordinates against a (D, H, W) = (z, y, x) volume.
    volume = grid.permute(2, 1, 0)[None, None].contiguous().float()
    near, far = _box_interval(origins, dirs, bound)
    hits = far > near
    out = torch.full((origins.shape[0],), -float("inf"))
    rows = hits.nonzero().squeeze(-1)
    steps = (torch.arange(samples, dtype=torch.float32) + 0.5) / samples
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        t = near[r, None] + (far[r] - near[r])[:, None] * steps  # (n, S)
        points = origins[r, None, :] + t[..., None] * dirs[r, None, :]
        coords = (points / bound).clamp(-1.0, 1.0)
        values = F.grid_sample(volume, coords[None, :, :, None, :], mode="bilinear", align_corners=True)
        out[r] = values[0, 0, :, :, 0].amax(dim=-1)
        advance(len(r))
    return out


@torch.no_grad()
def auto_threshold(grid: Tensor, bound: float, rays_o: Tensor, rays_d: Tensor, target_opacity: Tensor,
                   levels: int = 32, plateau_tolerance: float = 0.01, progress: bool | None = False) -> float:
    """Density level whose surface's silhouettes best match the field's rendered opacity (largest IoU).

    Why: the density at which a trained field's renders turn opaque drifts during training and
    differs between fields, so a fixed level gives bloated or eroded meshes. Rendered opacity > 0.5
    says what each view covers; a surface at level L covers exactly the rays along which the density
    somewhere exceeds L. Scoring candidate levels by the IoU of these two masks over several views
    picks the level at which the extracted surface covers what the renders cover.

    grid: (R, R, R) densities from `density_grid`; rays_o, rays_d: (B, H, W, 3) from `Cameras.rays()`;
    target_opacity: (B, H, W) rendered opacity. Each ray is sampled 2R times between its entry into and
    exit from the box, so no grid cell is skipped; the maximum along the ray decides every level at once.
    `levels` log-spaced candidates span robust percentiles of the positive densities (a trained field's
    surface is a steep, roughly exponential ramp), then as many again refine between the winner's neighbours.
    Among the levels within `plateau_tolerance` of the best IoU, the one with the least surface area wins
    (see below). `progress`: a bar over the rays, then the surfaces measured.
    """
    grid = grid.detach().float().cpu()
    positive = grid[grid > 0].numpy()
    if positive.size == 0:
        raise UserError("the field is empty (no positive density anywhere): train longer or check the run")
    target = target_opacity.detach().float().cpu().reshape(-1) > 0.5
    if not bool(target.any()):
        raise UserError("the renders are empty (opacity <= 0.5 everywhere): train longer or pass export.threshold=...")
    # Robust range: the top is the 99.9th percentile of positive densities (ignores a few spikes); below
    # 1e-4 of it a level would only trace empty-space noise.
    high = float(np.percentile(positive, 99.9))
    low = max(float(np.percentile(positive, 1.0)), high * 1e-4)
    if not high > low:
        low = high * 1e-4
    origins = rays_o.detach().float().cpu().reshape(-1, 3)
    dirs = rays_d.detach().float().cpu().reshape(-1, 3)
    shown = bar("mesh level: rays", len(origins), progress, unit="ray", unit_scale=True)
    with shown:
        peak = _ray_max_density(grid, bound, origins, dirs, samples=2 * grid.shape[0], advance=shown.update).double()

    def iou_of(candidates: Tensor) -> Tensor:
        hit = peak[None, :] > candidates[:, None]  # (levels, rays)
        inter = (hit & target[None]).sum(dim=1).double()
        union = (hit | target[None]).sum(dim=1).double()
        return inter / union.clamp(min=1)

    # Coarse log-spaced sweep over the whole range, then a fine one between the best level's neighbours.
    coarse = torch.logspace(np.log10(low), np.log10(high), levels, dtype=torch.float64)
    i = int(torch.argmax(iou_of(coarse)))
    fine = torch.logspace(float(torch.log10(coarse[max(i - 1, 0)])),
                          float(torch.log10(coarse[min(i + 1, levels - 1)])), levels, dtype=torch.float64)
    candidates = torch.cat([coarse, fine])
    iou = iou_of(candidates)
    # Silhouettes resolve a level only to a pixel, so a range of levels scores alike. Inside that range
    # the interior decides: a field's unseen interior keeps roughly its initial density, and a level
    # above it opens holes in the shell and adds inner surfaces. The smallest surface area among the
    # equally good levels is the closed outer shell.
    plateau = torch.sort(candidates[iou >= iou.max() - plateau_tolerance]).values
    if len(plateau) > 12:
        plateau = plateau[torch.linspace(0, len(plateau) - 1, 12).round().long()]
    coarse_grid = grid[::2, ::2, ::2].numpy() if grid.shape[0] > 64 else grid.numpy()
    areas = []
    with bar("mesh level: surfaces", len(plateau), progress, unit="level") as shown:
        for level in plateau:
            areas.append(_surface_area(coarse_grid, float(level)))
            shown.update(1)
    return float(plateau[int(np.argmin(areas))])


def _surface_area(grid: np.ndarray, level: float) -> float:
    """Area (in grid cells) of the marching-cubes surface at `level`."""
    import mcubes

    vertices, faces = mcubes.marching_cubes(grid, level)
    if len(faces) == 0:
        return float("inf")
    tri = vertices[faces.astype(np.int64)]
    return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


def _components(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """Connected-component label per face (faces sharing a vertex are connected)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate([faces[:, 0], faces[:, 1]])
    b = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n_vertices, n_vertices))
    _, labels = connected_components(graph, directed=False)
    return labels[faces[:, 0]]


def keep_large_components(faces: np.ndarray, n_vertices: int, fraction: float,
                           min_faces: int = 0) -> np.ndarray:
    """Faces of the components whose face count is at least `fraction` of the largest's and at least
    `min_faces`."""
    if (fraction <= 0 and min_faces <= 1) or len(faces) == 0:
        return faces
    labels = _components(faces, n_vertices)
    counts = np.bincount(labels)
    keep = (counts >= fraction * counts.max()) & (counts >= min_faces)
    return faces[keep[labels]]


def _compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop degenerate faces and vertices no face uses, renumbering the faces."""
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    used, inverse = np.unique(faces, return_inverse=True)
    return vertices[used], inverse.reshape(-1, 3)


# ---- repair: what every exported mesh goes through ---------------------------------------------------------
#
# Marching cubes and marching tetrahedra place a vertex on each crossing edge at the zero of a linear
# interpolation; where a grid value is (nearly) at the level, several such vertices land on one point. The
# faces between them have no area, and a file loader that merges coincident vertices (trimesh, Blender,
# MeshLab) turns them into pinched, non-manifold edges and one-face specks. Decimation can fold the surface
# the same way. `repair` removes all of it without moving the surface: see its docstring.

MERGE_TOLERANCE = 1e-6  # of the bounding-box diagonal: closer vertices are one point (float32 resolves ~1e-7)
# `repair` works to this multiple of the tolerance `mesh_defects` checks: files store coordinates to about
# 1e-6 (OBJ's %.6f), which can move a face's height or two vertices' distance by about that much, so a face
# or a pair just above the tolerance in memory could fall below it in the file a reader loads.
REPAIR_MARGIN = 4.0


def _tolerance(vertices: np.ndarray) -> float:
    """`MERGE_TOLERANCE` in the mesh's units (its bounding-box diagonal; 1 for an empty or flat one)."""
    if len(vertices) == 0:
        return MERGE_TOLERANCE
    diagonal = float(np.linalg.norm(vertices.max(axis=0).astype(np.float64) - vertices.min(axis=0)))
    return MERGE_TOLERANCE * (diagonal if diagonal > 0 else 1.0)


def _face_heights(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each face's smallest height (twice its area over its longest edge: how far it is from a segment) and
    the local corners (0, 1, 2) where its shortest and its longest edge start (edge c: corner c -> c + 1)."""
    v = vertices.astype(np.float64)
    tri = v[faces]
    edges = np.linalg.norm(tri[:, [1, 2, 0]] - tri, axis=2)  # (F, 3): edge c = corner c -> c + 1
    double_area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    height = double_area / np.maximum(edges.max(axis=1), 1e-300)
    return height, edges.argmin(axis=1), edges.argmax(axis=1)


def _merge_groups(n_vertices: int, pairs: np.ndarray) -> np.ndarray:
    """Group label per vertex, vertices joined by the (P, 2) `pairs` (transitively) sharing one."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(n_vertices, n_vertices))
    return connected_components(graph, directed=False)[1]


def _collapse(vertices: np.ndarray, faces: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge the vertices joined by `pairs` into their groups' mean position; faces that lose a corner go."""
    if len(pairs) == 0:
        return vertices, faces
    labels = _merge_groups(len(vertices), pairs)
    count = np.bincount(labels).astype(np.float64)
    merged = np.zeros((count.size, 3))
    np.add.at(merged, labels, vertices.astype(np.float64))
    return _compact((merged / count[:, None]).astype(vertices.dtype), labels[faces])


def _flip_caps(faces: np.ndarray, caps: np.ndarray, longest: np.ndarray, thin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip the longest edge of each cap (a, b, c) (corner c on the edge a -> b) with the face (b, a, x) across
    it: (a, x, c) and (x, b, c) cover that face exactly, so the surface does not move. Returns the faces and
    the caps that could not be flipped this way (no single face across, that face thin or wanted by another
    cap, or the edge c-x already there)."""
    k = longest[caps]
    a, b, c = faces[caps, k], faces[caps, (k + 1) % 3], faces[caps, (k + 2) % 3]
    n = int(faces.max()) + 1
    start, end = faces.reshape(-1), faces[:, [1, 2, 0]].reshape(-1)
    directed = start * n + end
    order = np.argsort(directed, kind="stable")
    want = b * n + a
    pos = np.searchsorted(directed[order], want)
    found = (pos < len(order)) & (directed[order][np.minimum(pos, len(order) - 1)] == want)
    unique = found & ((pos + 1 >= len(order)) | (directed[order][np.minimum(pos + 1, len(order) - 1)] != want))
    half = order[np.minimum(pos, len(order) - 1)]
    j = half // 3
    x = faces.reshape(-1)[3 * j + (half % 3 + 2) % 3]
    undirected = np.unique(np.minimum(start, end) * n + np.maximum(start, end))
    ok = unique & ~thin[j] & ~np.isin(np.minimum(c, x) * n + np.maximum(c, x), undirected)
    ok &= np.bincount(j[ok], minlength=len(faces))[j] == 1  # one cap per face across
    ok &= ~np.isin(caps, j[ok])
    out = faces.copy()
    out[caps[ok]] = np.stack([a, x, c], axis=1)[ok]
    out[j[ok]] = np.stack([x, b, c], axis=1)[ok]
    return out, caps[~ok]


def _collapse_degenerate(vertices: np.ndarray, faces: np.ndarray, tol: float,
                         rounds: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Vertices within `tol` merged (needles: two corners at one point), then each face thinner than `tol`
    (a cap: one corner on the opposite edge) flipped with its neighbour (`_flip_caps`), or, where it cannot
    be, collapsed along its shortest edge; until none is left (`rounds` bounds it).

    Merging and flipping keep the surface where it was (to `tol`); a collapse moves a cap's corner along the
    line it lies on, which shifts the faces on its other side: the last resort."""
    from scipy.spatial import cKDTree

    vertices, faces = _collapse(vertices, faces, cKDTree(vertices.astype(np.float64)).query_pairs(tol, output_type="ndarray"))
    for _ in range(rounds):
        if len(faces) == 0:
            break
        height, shortest, longest = _face_heights(vertices, faces)
        thin = height < tol
        if not thin.any():
            break
        faces, stuck = _flip_caps(faces, np.flatnonzero(thin), longest, thin)
        pairs = np.stack([faces[stuck, shortest[stuck]], faces[stuck, (shortest[stuck] + 1) % 3]], axis=1)
        vertices, faces = _collapse(vertices, faces, pairs)
    return vertices, faces


def _drop_duplicate_faces(faces: np.ndarray) -> np.ndarray:
    """One face per vertex triple, with the winding most of its copies have.

    A triple present as often with one winding as with the other is either a zero-thickness sheet between
    two solids that touch along it (each of its edges has two more faces: the solids' own), which goes
    entirely so the solids join into one; or a stray reversed copy on a surface (an edge with one other face),
    of which the copy that runs its edges against its neighbours' stays.
    """
    if len(faces) == 0:
        return faces
    key = np.sort(faces, axis=1)
    # Winding parity: a face is an even permutation of its sorted triple (same orientation) or an odd one.
    first = np.argmin(faces, axis=1)
    rolled = faces[np.arange(len(faces))[:, None], (first[:, None] + np.arange(3)) % 3]
    even = rolled[:, 1] < rolled[:, 2]
    _, group, count = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    n_even = np.bincount(group, weights=even.astype(np.float64), minlength=len(count))
    tie = 2 * n_even == count
    wanted = np.where((2 * n_even > count)[group], even, ~even) & ~tie[group]
    keep = np.zeros(len(faces), dtype=bool)
    rows = np.flatnonzero(wanted)
    _, first_wanted = np.unique(group[rows], return_index=True)
    keep[rows[first_wanted]] = True
    if tie.any():
        # Directed half-edges of all faces, to look at each tied triple's neighbours.
        directed: dict[tuple[int, int], int] = {}
        for f in faces[~tie[group]]:
            for c in range(3):
                pair = (int(f[c]), int(f[(c + 1) % 3]))
                directed[pair] = directed.get(pair, 0) + 1
        for g in np.flatnonzero(tie):
            members = np.flatnonzero(group == g)
            f = faces[members[0]]
            edges = [(int(f[c]), int(f[(c + 1) % 3])) for c in range(3)]
            # Faces outside the triple running this copy's edges against it / along it.
            against = sum(directed.get((b, a), 0) for a, b in edges)
            along = sum(directed.get(e, 0) for e in edges)
            if all(directed.get(e, 0) + directed.get(e[::-1], 0) >= 2 for e in edges) or against == along:
                continue  # a sheet between two solids: nothing stays
            keep[members[0] if against > along else next(m for m in members if even[m] != even[members[0]])] = True
    return faces[keep]


def _edge_faces(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-edges grouped by undirected edge: (order (3F,) of half-edges h = 3 face + corner, sorted by edge;
    edge id (3F,) per sorted entry; faces per edge (E,); start vertex (3F,) per half-edge, unsorted)."""
    start = faces.reshape(-1)
    end = faces[:, [1, 2, 0]].reshape(-1)
    key = np.stack([np.minimum(start, end), np.maximum(start, end)], axis=1)
    _, edge, count = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    edge = edge.reshape(-1)
    order = np.argsort(edge, kind="stable")
    return order, edge[order], count, start


def _pair_around_edges(vertices: np.ndarray, faces: np.ndarray, order: np.ndarray, edge: np.ndarray,
                       count: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-edge pairs (h1, h2) across the edges with more than two faces: the two faces bounding one wedge
    of solid around the edge (two cubes sharing an edge: each cube's own two faces).

    The faces are sorted by angle around the edge u -> v. A face running u -> v faces (its outward normal,
    from the winding) toward larger angles, so the solid is on its smaller-angle side; one running v -> u
    has the solid on its larger-angle side. A v -> u face and the next face counter-clockwise, if that runs
    u -> v, enclose solid: they are paired. Faces left unpaired (inconsistent windings) join nothing there.
    """
    v = vertices.astype(np.float64)
    first = np.flatnonzero(np.r_[True, edge[1:] != edge[:-1]])
    h1: list[int] = []
    h2: list[int] = []
    for i in first[count[edge[first]] > 2]:
        hs = order[i:i + count[edge[i]]]
        u = start[hs[0]]
        w = faces.reshape(-1)[3 * (hs // 3) + (hs % 3 + 2) % 3]  # the corner opposite each half-edge
        end = faces.reshape(-1)[3 * (hs // 3) + (hs % 3 + 1) % 3]
        forward = start[hs] == u  # runs u -> v
        other = np.where(forward, end, start[hs])[0]
        axis = v[other] - v[u]
        axis /= max(np.linalg.norm(axis), 1e-300)
        b1 = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
        b1 /= np.linalg.norm(b1)
        b2 = np.cross(axis, b1)
        d = v[w] - v[u]
        angle = np.arctan2(d @ b2, d @ b1)
        ring = np.argsort(angle)
        for k, j in enumerate(ring):
            nxt = ring[(k + 1) % len(ring)]
            if not forward[j] and forward[nxt]:
                h1.append(int(hs[j]))
                h2.append(int(hs[nxt]))
    return np.asarray(h1, dtype=np.int64), np.asarray(h2, dtype=np.int64)


def _fans(vertices: np.ndarray, faces: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of fans, fan label per corner (3F,), corner h = 3 face + local corner): corners of one vertex
    whose faces are connected through shared edges, an edge with more than two faces connecting only the
    pairs `_pair_around_edges` finds (`_split_non_manifold`)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    order, edge, count, start = _edge_faces(faces)
    # Pairs of half-edges of the edges with exactly two faces: consecutive entries of one such edge.
    two = count[edge] == 2
    lead = np.flatnonzero(two[:-1] & (edge[:-1] == edge[1:]))
    more_1, more_2 = _pair_around_edges(vertices, faces, order, edge, count, start)
    h1, h2 = np.concatenate([order[lead], more_1]), np.concatenate([order[lead + 1], more_2])
    nxt = lambda h: 3 * (h // 3) + (h % 3 + 1) % 3  # noqa: E731 - corner where half-edge h ends
    same = start[h1] == start[h2]  # both faces run the edge the same way (inconsistent winding)
    a = np.concatenate([h1, nxt(h1)])
    b = np.concatenate([np.where(same, h2, nxt(h2)), np.where(same, nxt(h2), h2)])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(faces.size, faces.size))
    return connected_components(graph, directed=False)


def _split_non_manifold(vertices: np.ndarray, faces: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Give each fan of faces around a vertex its own copy of the vertex, so that no edge has more than two
    faces and no vertex joins two surfaces at a point.

    Fans: faces around a vertex connected through the edges they share (`_fans`); at an edge with three or
    more faces (two cubes sharing an edge, a fin on a surface) only the two faces of each wedge of solid
    connect, so each surface keeps its own pair there and a fin is cut off. A vertex with several fans is
    copied once per fan; the copies of all but its largest fan move by 10 x `tol` toward their fan's other
    vertices: far enough that loaders which merge coincident vertices keep them apart, far too little to
    see (1e-5 of the diagonal).
    """
    if len(faces) == 0:
        return vertices, faces
    n_fans, fan = _fans(vertices, faces)
    vertex_of_fan = np.zeros(n_fans, dtype=np.int64)
    vertex_of_fan[fan] = faces.reshape(-1)
    fans_per_vertex = np.bincount(vertex_of_fan, minlength=len(vertices))
    if not (fans_per_vertex > 1).any():
        return vertices, faces
    size = np.bincount(fan, minlength=n_fans)
    # The largest fan of each vertex (ties: the first) keeps the vertex, index and position; the others get
    # new vertices after the existing ones, moved toward the mean of their fan's other corners.
    by_size = np.lexsort((np.arange(n_fans), -size, vertex_of_fan))
    keeps = np.zeros(n_fans, dtype=bool)
    keeps[by_size[np.r_[True, vertex_of_fan[by_size][1:] != vertex_of_fan[by_size][:-1]]]] = True
    moved = np.flatnonzero(~keeps)
    index = vertex_of_fan.copy()
    index[moved] = len(vertices) + np.arange(len(moved))
    others = vertices[faces[:, [1, 2, 0]]].astype(np.float64) + vertices[faces[:, [2, 0, 1]]]
    centre = np.zeros((n_fans, 3))
    np.add.at(centre, fan, others.reshape(-1, 3) / 2)
    origin = vertices[vertex_of_fan[moved]].astype(np.float64)
    direction = centre[moved] / size[moved, None] - origin
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-300)
    new_vertices = np.concatenate([vertices, (origin + 10 * tol * direction).astype(vertices.dtype)])
    return new_vertices, index[fan].reshape(-1, 3)


def repair(vertices: np.ndarray, faces: np.ndarray, keep_components: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A mesh without zero-area or duplicate faces, coincident vertices, non-manifold edges or vertices, or
    specks: what a file's reader (merging coincident vertices) sees as one closed surface per part.

    In order: vertices closer than `MERGE_TOLERANCE` x the diagonal (with `REPAIR_MARGIN`) merged and
    zero-area faces flipped away or collapsed (`_collapse_degenerate`); duplicate faces dropped
    (`_drop_duplicate_faces`); vertices where surfaces meet split (`_split_non_manifold`); then components
    with fewer than 4 faces (no closed surface has fewer: one-face specks, split-off fins) and, when
    `keep_components` > 0, those under that fraction of the largest's faces dropped.
    """
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    vertices, faces = _compact(vertices, faces)
    if len(faces) == 0:
        return vertices, faces
    tol = _tolerance(vertices)
    vertices, faces = _collapse_degenerate(vertices, faces, REPAIR_MARGIN * tol)
    faces = _drop_duplicate_faces(faces)
    vertices, faces = _split_non_manifold(*_compact(vertices, faces), tol)
    faces = keep_large_components(faces, len(vertices), keep_components, min_faces=4)
    return _compact(vertices, faces)


def mesh_defects(vertices: np.ndarray, faces: np.ndarray) -> dict[str, int]:
    """Counts of what `repair` removes, as a reader that merges coincident vertices would see them (why an
    export is not clean): zero-area faces (thinner than `MERGE_TOLERANCE` x the diagonal), duplicate faces
    (one vertex triple twice), duplicate vertices (within the tolerance), non-manifold edges (more than two
    faces), non-manifold vertices (several fans of faces meet there), boundary edges (one face: holes),
    components, and one-face components; 0 everywhere but `components` for a clean closed mesh."""
    from scipy.spatial import cKDTree

    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    tol = _tolerance(vertices)
    pairs = cKDTree(vertices.astype(np.float64)).query_pairs(tol, output_type="ndarray")
    groups = _merge_groups(len(vertices), pairs)
    merged = groups[faces]
    degenerate = (merged[:, 0] == merged[:, 1]) | (merged[:, 1] == merged[:, 2]) | (merged[:, 0] == merged[:, 2])
    height = _face_heights(vertices, faces)[0]
    proper = merged[~degenerate]
    counts = np.zeros(0, dtype=np.int64)
    if len(proper):
        _, _, counts, _ = _edge_faces(proper)
    labels = _components(merged, groups.max() + 1 if len(groups) else 0) if len(faces) else np.zeros(0, np.int64)
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    fans_per_vertex = np.zeros(0, np.int64)
    if len(proper):
        positions = np.zeros((groups.max() + 1, 3), dtype=np.float32)
        positions[groups] = vertices
        n_fans, fan = _fans(positions, proper)
        vertex_of_fan = np.zeros(n_fans, dtype=np.int64)
        vertex_of_fan[fan] = proper.reshape(-1)
        fans_per_vertex = np.bincount(vertex_of_fan)
    return {
        "zero_area_faces": int((degenerate | (height < tol)).sum()),
        "duplicate_faces": int(len(proper) - len(np.unique(np.sort(proper, axis=1), axis=0))) if len(proper) else 0,
        "duplicate_vertices": int(len(vertices) - len(np.unique(groups))),
        "non_manifold_edges": int((counts > 2).sum()),
        "non_manifold_vertices": int((fans_per_vertex > 1).sum()),
        "boundary_edges": int((counts == 1).sum()),
        "components": int((sizes > 0).sum()),
        "one_face_components": int((sizes == 1).sum()),
    }


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit vertex normals, the area-weighted mean of the adjacent faces' normals.

    The unnormalised cross product is twice the face area times its normal, so summing it weights
    by area for free. A vertex with no area around it gets +y rather than NaN.
    """
    v = vertices.astype(np.float64)
    cross = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    acc = np.zeros_like(v)
    for c in range(3):
        np.add.at(acc, faces[:, c], cross)
    length = np.linalg.norm(acc, axis=1, keepdims=True)
    normals = np.where(length > 1e-20, acc / np.maximum(length, 1e-20), np.array([0.0, 1.0, 0.0]))
    return normals.astype(np.float32)


def clean_mesh(vertices: np.ndarray, faces: np.ndarray, keep_components: float = 0.05,
               decimate_faces: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`repair` (zero-area and duplicate faces, coincident vertices, non-manifold edges and vertices, specks,
    and parts with fewer than `keep_components` x the largest part's faces: floaters); then decimate to about
    `decimate_faces` faces when that is > 0 (which repairs again)."""
    vertices, faces = repair(vertices, faces, keep_components)
    if decimate_faces > 0 and len(faces) > decimate_faces:
        vertices, faces = decimate(vertices, faces, decimate_faces)
    return vertices, faces


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation to about `target_faces` faces (fast_simplification), then `repair`:
    collapses can fold the surface onto itself (duplicate faces, non-manifold edges)."""
    import fast_simplification

    if target_faces <= 0 or len(faces) <= target_faces:
        return vertices, faces
    v, f = fast_simplification.simplify(vertices.astype(np.float64), faces.astype(np.int32),
                                        target_count=int(target_faces))
    return repair(np.asarray(v, dtype=np.float32), np.asarray(f, dtype=np.int64))


@torch.no_grad()
def _colors(albedo_fn: AlbedoFn, vertices: np.ndarray, device: str | torch.device,
            chunk: int = 65536) -> np.ndarray:
    out = []
    for start in range(0, len(vertices), chunk):
        points = torch.from_numpy(vertices[start:start + chunk]).float().to(device)
        out.append(albedo_fn(points).reshape(-1, 3).float().clamp(0.0, 1.0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 3), np.float32)


def extract_mesh(density_fn: DensityFn, albedo_fn: AlbedoFn | None, bound: float, resolution: int,
                 threshold: float, keep_components: float = 0.05, decimate_faces: int = 0,
                 device: str | torch.device = "cpu", grid: Tensor | None = None,
                 progress: bool | None = False) -> Mesh:
    """Surface where density == `threshold`, as a cleaned, coloured, outward-facing triangle mesh.

    Cavities enclosed by the surface are filled. The grid is padded by one cell of empty space before marching cubes so that a part touching the
    box is closed off (watertight) instead of left open; such vertices are clamped back onto the box.
    The surface is `repair`ed (no zero-area or duplicate faces, no non-manifold edges, one closed surface per
    part); components with fewer than `keep_components` x the largest component's faces are floaters and are
    dropped. `grid` may be passed to reuse one already sampled (e.g. by `auto_threshold`'s caller).
    `progress`: a bar over the stages (sampling the grid has its own).
    """
    import mcubes
    from scipy import ndimage

    if grid is None:
        grid = density_grid(density_fn, bound, resolution, device, progress=progress)
    grid = grid.detach().float().cpu()
    res = grid.shape[0]
    lo, hi = float(grid.min()), float(grid.max())
    if not np.isfinite(threshold) or not hi > threshold:
        raise UserError(f"the field is empty at density level {threshold:g} (max density {hi:g}): "
                        f"train longer or pass a lower export.threshold=...")
    if not lo < threshold:
        raise UserError(f"the field is solid at density level {threshold:g} (min density {lo:g}): "
                        f"pass a higher export.threshold=...")
    stages = ["fill cavities", "marching cubes", "clean-up"] + (["decimation"] if decimate_faces > 0 else [])
    stages.append("normals" if albedo_fn is None else "normals, colours")
    with bar("mesh", len(stages), progress, unit="stage") as shown:
        begun: list[str] = []

        def stage(name: str) -> None:
            """Count the stage just finished and name the one starting."""
            if begun:
                shown.update(1)
            begun.append(name)
            shown.set_postfix_str(name)

        stage(stages[0])
        values = grid.numpy().astype(np.float64)
        # Fill enclosed cavities: no camera sees inside a closed surface, so empty space there is interior
        # the renders never trained, not geometry (it would come out as an inner surface).
        solid = values > threshold
        cavity = ndimage.binary_fill_holes(solid) & ~solid
        if cavity.any():
            values = np.where(cavity, hi, values)
        padded = np.pad(values, 1, mode="constant", constant_values=min(lo, 0.0))
        stage("marching cubes")
        vertices, faces = mcubes.marching_cubes(padded, float(threshold))
        # Index coordinates -> scene: padded index 1 is lattice index 0 (-bound), index R is +bound.
        scale = 2.0 * bound / (res - 1)
        vertices = np.clip((vertices - 1.0) * scale - bound, -bound, bound).astype(np.float32)
        faces = np.asarray(faces, dtype=np.int64)
        if len(faces) == 0:
            raise UserError(f"no surface at density level {threshold:g}: train longer or pass export.threshold=...")
        stage("clean-up")
        vertices, faces = repair(vertices, faces, keep_components)
        if decimate_faces > 0:
            stage(f"decimation to {decimate_faces} faces")
            vertices, faces = decimate(vertices, faces, decimate_faces)
        stage(stages[-1])
        normals = vertex_normals(vertices, faces)
        colors = None
        if albedo_fn is not None:
            # Read the albedo half a cell inside the surface: renders weight the dense side of the level set,
            # so that is where the albedo was trained; just outside it is barely constrained (oracle torus:
            # colour error 0.036 half a cell inside against 0.099 on the level set).
            colors = _colors(albedo_fn, vertices - 0.5 * scale * normals, device)
        shown.update(1)
    return Mesh(vertices=vertices, faces=faces, colors=colors, normals=normals)
