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


def _keep_large_components(faces: np.ndarray, n_vertices: int, fraction: float) -> np.ndarray:
    """Faces of the components whose face count is at least `fraction` of the largest's."""
    if fraction <= 0 or len(faces) == 0:
        return faces
    labels = _components(faces, n_vertices)
    counts = np.bincount(labels)
    keep = counts >= fraction * counts.max()
    return faces[keep[labels]]


def _compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop degenerate faces and vertices no face uses, renumbering the faces."""
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    used, inverse = np.unique(faces, return_inverse=True)
    return vertices[used], inverse.reshape(-1, 3)


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
    """Drop degenerate faces, unused vertices and parts with fewer than `keep_components` x the largest
    part's faces (floaters); then decimate to about `decimate_faces` faces when that is > 0."""
    vertices, faces = _compact(vertices, faces)
    faces = _keep_large_components(faces, len(vertices), keep_components)
    vertices, faces = _compact(vertices, faces)
    if decimate_faces > 0 and len(faces) > decimate_faces:
        vertices, faces = decimate(vertices, faces, decimate_faces)
        vertices, faces = _compact(vertices, faces)
    return vertices, faces


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation to about `target_faces` faces (fast_simplification)."""
    import fast_simplification

    if target_faces <= 0 or len(faces) <= target_faces:
        return vertices, faces
    v, f = fast_simplification.simplify(vertices.astype(np.float64), faces.astype(np.int32),
                                        target_count=int(target_faces))
    return np.asarray(v, dtype=np.float32), np.asarray(f, dtype=np.int64)


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
    Components with fewer than `keep_components` x the largest component's faces are floaters and are
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
        vertices, faces = _compact(vertices, faces)
        faces = _keep_large_components(faces, len(vertices), keep_components)
        vertices, faces = _compact(vertices, faces)
        if decimate_faces > 0:
            stage(f"decimation to {decimate_faces} faces")
            if len(faces) > decimate_faces:
                vertices, faces = decimate(vertices, faces, decimate_faces)
                vertices, faces = _compact(vertices, faces)
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
