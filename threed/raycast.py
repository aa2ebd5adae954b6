"""Mesh ray casting (Möller–Trumbore) and a small mesh renderer, in plain PyTorch on any device.

Used every training step by the oracle prior, so it is built for speed on a CPU:

- faces are grouped once into spatially compact clusters of `cluster_size` faces by recursive median
  splits of their centroids, which also gives a complete binary tree of bounding boxes (a BVH,
  `build_clusters`);
- rays descend the tree breadth-first, all rays at once: a (ray, node) pair survives a level only if
  the ray meets the node's box (slab test), so only the (ray, cluster) pairs whose boxes the ray
  crosses go through the exact ray/triangle test;
- work is chunked so that at most `chunk` ray/triangle tests are held in memory at once.

The renderer casts s x s rays per pixel (`supersample`) and averages them, so silhouette pixels get a
fractional coverage like the soft edges of a volume render instead of a hard 0/1 edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from threed.cameras import Cameras
from threed.render.shading import shade

# Barycentric slack: a ray through a shared edge or vertex must hit at least one of the faces
# despite float32 rounding, so faces are grown by this fraction of their own extent.
_BARY_TOL = 1e-5
_LEVEL_STEP = 2


@dataclass
class RayHits:
    """Nearest positive hit per ray. Misses have hit=False, t=inf, face=-1, bary=0."""

    hit: Tensor  # (N,) bool
    t: Tensor  # (N,) distance along the (unit or not) direction: point = o + t * d
    face: Tensor  # (N,) long
    bary: Tensor  # (N, 3) weights of the face's vertices 0, 1, 2


@dataclass
class FaceClusters:
    """Faces grouped into C spatially compact clusters of S faces (padding repeats real faces)."""

    face_index: Tensor  # (C, S) long, index into the mesh's faces
    tri: Tensor  # (C, 9, S): v0 xyz, e1 = v1 - v0 xyz, e2 = v2 - v0 xyz, component-major for fast math
    levels: list[Tensor]  # BVH boxes per level, (2^l, 6) = (lo xyz, hi xyz); the last level = clusters


def build_clusters(vertices: Tensor, faces: Tensor, cluster_size: int = 8) -> FaceClusters:
    """Split faces into clusters by recursive median cuts along each group's longest centroid axis.

    The number of clusters is a power of two; the face list is padded to fill them by repeating faces,
    which only costs a few duplicate (identical) hits.
    """
    if faces.numel() == 0:
        raise ValueError("cannot ray cast a mesh without faces")
    vertices = vertices.float()
    faces = faces.long().to(vertices.device)
    n_faces = faces.shape[0]
    n_clusters = 1 << max(0, math.ceil(math.log2(max(1, n_faces / cluster_size))))
    size = math.ceil(n_faces / n_clusters)
    tri = vertices[faces]  # (F, 3, 3)
    centroid = tri.mean(dim=1)
    index = (torch.arange(n_clusters * size, device=vertices.device) % n_faces).view(1, -1)
    while index.shape[0] < n_clusters:
        c = centroid[index]  # (G, n, 3)
        axis = (c.amax(dim=1) - c.amin(dim=1)).argmax(dim=-1)  # (G,)
        key = c.gather(2, axis.view(-1, 1, 1).expand(-1, c.shape[1], 1)).squeeze(-1)
        index = index.gather(1, key.argsort(dim=1)).reshape(index.shape[0] * 2, -1)
    ctri = tri[index]  # (C, S, 3, 3)
    flat = ctri.reshape(n_clusters, -1, 3)
    # Row g of a level splits into rows 2g and 2g+1 of the next, so parents are pairwise unions.
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    levels = [torch.cat([lo, hi], dim=-1)]
    while lo.shape[0] > 1:
        lo, hi = lo.view(-1, 2, 3).amin(dim=1), hi.view(-1, 2, 3).amax(dim=1)
        levels.insert(0, torch.cat([lo, hi], dim=-1))
    packed = torch.cat([ctri[:, :, 0], ctri[:, :, 1] - ctri[:, :, 0], ctri[:, :, 2] - ctri[:, :, 0]], dim=-1)
    return FaceClusters(index, packed.transpose(1, 2).contiguous(), levels)


def _ray_box_pairs(clusters: FaceClusters, rays_o: Tensor, rays_d: Tensor, t_min: float) -> tuple[Tensor, Tensor]:
    """(ray, cluster) index pairs whose ray segment [t_min, inf) crosses the cluster's box, by descending
    the BVH level by level (slab tests on the surviving (ray, node) pairs only)."""
    safe_d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    ray_data = torch.cat([rays_o, 1.0 / safe_d], dim=-1)  # (N, 6): origin, inverse direction
    root = clusters.levels[0][0]
    pad = 1e-6 * max(1.0, float((root[3:] - root[:3]).max()))  # keep flat boxes (planes) hittable
    ray_idx = torch.arange(rays_o.shape[0], device=rays_o.device)
    node = torch.zeros_like(ray_idx)
    # Visit every `_LEVEL_STEP`-th level (a 2^step-ary tree): fewer, larger tensor ops, which is what
    # costs on a CPU; the leaf level is always visited.
    depths = list(range(0, len(clusters.levels), _LEVEL_STEP))
    if depths[-1] != len(clusters.levels) - 1:
        depths.append(len(clusters.levels) - 1)
    prev = 0
    for depth in depths:
        boxes = clusters.levels[depth]
        if depth > prev:  # each surviving pair splits into the node's descendants at `depth`
            k = 1 << (depth - prev)
            ray_idx = ray_idx.repeat_interleave(k)
            node = (node[:, None] * k + torch.arange(k, device=node.device)).reshape(-1)
            prev = depth
        ray = ray_data.index_select(0, ray_idx)
        box = boxes.index_select(0, node)
        o, inv = ray[:, :3], ray[:, 3:]
        t0 = (box[:, :3] - pad - o) * inv
        t1 = (box[:, 3:] + pad - o) * inv
        near = torch.minimum(t0, t1).amax(dim=-1)
        far = torch.maximum(t0, t1).amin(dim=-1)
        keep = (far >= near.clamp_min(t_min)).nonzero().squeeze(1)
        ray_idx, node = ray_idx.index_select(0, keep), node.index_select(0, keep)
    return ray_idx, node


def _intersect_pairs(clusters: FaceClusters, o: Tensor, d: Tensor, cluster_idx: Tensor,
                     t_min: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Möller–Trumbore for each ray (P, 3) against every face of its paired cluster, written per
    component (much faster on a CPU than (P, S, 3) cross products).

    Returns per pair: nearest t (inf if none), the face slot within the cluster, and (u, v).
    """
    # Operands laid out (S, P) with the long pair axis innermost, rays as (1, P) rows: same-shape or
    # row-broadcast arithmetic over a contiguous inner axis is the fast path on a CPU.
    tri = clusters.tri.index_select(0, cluster_idx).permute(1, 2, 0).contiguous()  # (9, S, P)
    rays = torch.cat([o, d], dim=-1).t().contiguous()[:, None]  # (6, 1, P)
    v0x, v0y, v0z, ax, ay, az, bx, by, bz = tri.unbind(0)
    ox, oy, oz, dx, dy, dz = rays.unbind(0)
    px, py, pz = dy * bz - dz * by, dz * bx - dx * bz, dx * by - dy * bx  # pvec = d x e2
    det = ax * px + ay * py + az * pz
    ok = det.abs() > 1e-12
    inv_det = 1.0 / torch.where(ok, det, torch.ones_like(det))
    tx, ty, tz = ox - v0x, oy - v0y, oz - v0z  # tvec = o - v0
    u = (tx * px + ty * py + tz * pz) * inv_det
    qx, qy, qz = ty * az - tz * ay, tz * ax - tx * az, tx * ay - ty * ax  # qvec = tvec x e1
    v = (dx * qx + dy * qy + dz * qz) * inv_det
    t = (bx * qx + by * qy + bz * qz) * inv_det
    ok &= (u >= -_BARY_TOL) & (v >= -_BARY_TOL) & (u + v <= 1.0 + _BARY_TOL) & (t > t_min)
    t = torch.where(ok, t, torch.full_like(t, math.inf))
    best_t, slot = t.min(dim=0)
    best_u = u.gather(0, slot[None]).squeeze(0)
    best_v = v.gather(0, slot[None]).squeeze(0)
    return best_t, slot, best_u, best_v


@torch.no_grad()
def raycast(vertices: Tensor, faces: Tensor, rays_o: Tensor, rays_d: Tensor, clusters: FaceClusters | None = None,
            t_min: float = 1e-6, chunk: int = 1 << 20) -> RayHits:
    """Nearest hit with t > t_min of each ray (N, 3) with the triangle mesh (V, 3) / (F, 3); both faces count.

    `clusters` (from `build_clusters`) can be built once and reused when the mesh does not change.
    `chunk` bounds the ray/triangle tests held in memory at once (rays go through the tree in batches
    of chunk / (2 S), S = faces per cluster).
    """
    if clusters is None:
        clusters = build_clusters(vertices, faces)
    device = clusters.tri.device
    rays_o = rays_o.reshape(-1, 3).to(device=device, dtype=torch.float32)
    rays_d = rays_d.reshape(-1, 3).to(device=device, dtype=torch.float32)
    n = rays_o.shape[0]
    n_clusters, size = clusters.face_index.shape
    best_t = torch.full((n,), math.inf, device=device)
    best_face = torch.full((n,), -1, dtype=torch.long, device=device)
    best_uv = torch.zeros(n, 2, device=device)
    ray_step = max(1, chunk // (2 * size))
    pair_step = max(1, chunk // size)
    for r0 in range(0, n, ray_step):
        o, d = rays_o[r0:r0 + ray_step], rays_d[r0:r0 + ray_step]
        ray_idx, cluster_idx = _ray_box_pairs(clusters, o, d, t_min)
        for p0 in range(0, ray_idx.shape[0], pair_step):
            ri, ci = ray_idx[p0:p0 + pair_step], cluster_idx[p0:p0 + pair_step]
            t, slot, u, v = _intersect_pairs(clusters, o.index_select(0, ri), d.index_select(0, ri), ci, t_min)
            gi = ri + r0
            # Keep, per ray, the pair with the smallest t (ties: any of them).
            best_t.scatter_reduce_(0, gi, t, reduce="amin")
            win = torch.isfinite(t) & (t == best_t[gi])
            best_face[gi[win]] = clusters.face_index[ci[win], slot[win]]
            best_uv[gi[win]] = torch.stack([u[win], v[win]], dim=-1)
    hit = torch.isfinite(best_t)
    bary = torch.stack([1.0 - best_uv[:, 0] - best_uv[:, 1], best_uv[:, 0], best_uv[:, 1]], dim=-1)
    bary = torch.where(hit[:, None], bary.clamp(0.0, 1.0), torch.zeros_like(bary))
    bary = bary / bary.sum(-1, keepdim=True).clamp_min(1e-12)
    return RayHits(hit, best_t, best_face, bary)


def corner_normals(vertices: Tensor, faces: Tensor, smooth_angle: float = 30.0) -> Tensor:
    """Per-face-corner normals (F, 3, 3): the area-weighted vertex normal where it is within `smooth_angle`
    degrees of the face normal, else the face normal.

    Why: a field's normals (the density gradient) describe a smooth surface, so a tessellated sphere must
    shade like a sphere, not like facets; but averaging across a real crease (a box edge) would shade a
    flat face as curved, so corners across a sharp edge keep the flat normal ("auto smooth").
    """
    vertices = vertices.float()
    faces = faces.long()
    tri = vertices[faces]
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # 2 * area * normal
    face_n = cross / cross.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    vert_n = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), cross.repeat_interleave(3, dim=0))
    vert_n = vert_n / vert_n.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    corner = vert_n[faces]  # (F, 3, 3)
    if smooth_angle <= 0:
        return face_n[:, None].expand(-1, 3, -1).clone()
    smooth = (corner * face_n[:, None]).sum(-1, keepdim=True) >= math.cos(math.radians(smooth_angle))
    return torch.where(smooth, corner, face_n[:, None].expand_as(corner))


def _supersampled(cameras: Cameras, s: int) -> Cameras:
    """The same cameras at s times the resolution: its pixel centres form an s x s grid in each pixel."""
    return Cameras(cameras.c2w, cameras.fovy, cameras.elevation, cameras.azimuth, cameras.distance,
                   cameras.light_position, cameras.width * s, cameras.height * s)


@torch.no_grad()
def render_mesh(vertices: Tensor, faces: Tensor, vertex_colors: Tensor, cameras: Cameras, shading: str,
                ambient: float, background: Tensor, supersample: int = 2, clusters: FaceClusters | None = None,
                normals: Tensor | None = None, environment: tuple | None = None,
                roughness_metallic: Tensor | None = None) -> Tensor:
    """Render a vertex-coloured mesh (B, H, W, 3), shaded like the volume renderer and composited over
    `background` (B, H, W, 3). Shading `pbr`: split-sum image-based lighting (threed/render/ibl.py) of the
    vertex colours as albedo with per-vertex (roughness, metallic) `roughness_metallic` (V, 2), under
    `environment` (an EnvironmentLight and its BRDF table), clamped to [0, 1] like the mesh scene's.

    Per hit: albedo = barycentric vertex colour; normal = barycentric corner normal (`corner_normals`,
    pass `normals` (F, 3, 3) to reuse them), flipped to face the camera so that open or inconsistently
    wound meshes shade from the side that is seen (for a closed mesh seen from outside this is the
    outward normal, as the field's density gradient gives); point = hit point; light =
    cameras.light_position. Shading is threed.render.shading.shade.
    """
    s = int(supersample)
    if s < 1:
        raise ValueError("supersample must be >= 1")
    device = vertices.device
    faces = faces.long().to(device)
    cameras = cameras.to(device)
    b, h, w = len(cameras), cameras.height, cameras.width
    if clusters is None:
        clusters = build_clusters(vertices, faces)
    if normals is None and shading != "albedo":
        normals = corner_normals(vertices, faces)
    origins, dirs = _supersampled(cameras, s).rays()  # (B, sH, sW, 3)
    rays_o, rays_d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    hits = raycast(vertices, faces, rays_o, rays_d, clusters=clusters)
    color = torch.zeros(rays_o.shape[0], 3, device=device)
    idx = hits.hit.nonzero(as_tuple=True)[0]
    if idx.numel() > 0:
        face = hits.face[idx]
        bary = hits.bary[idx][:, :, None]  # (M, 3, 1)
        albedo = (vertex_colors.float().to(device)[faces[face]] * bary).sum(1)
        normal = points = light = None
        if shading != "albedo":
            normal = (normals[face] * bary).sum(1)
            normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-20)
            facing = (normal * rays_d[idx]).sum(-1, keepdim=True) > 0
            normal = torch.where(facing, -normal, normal)
            points = rays_o[idx] + hits.t[idx, None] * rays_d[idx]
            ray_cam = torch.div(idx, s * h * s * w, rounding_mode="floor")
            light = cameras.light_position.float()[ray_cam]
        if shading == "pbr":
            from threed.render.ibl import shade_pbr

            assert environment is not None and roughness_metallic is not None, "pbr shading needs a material"
            rm = (roughness_metallic.float().to(device)[faces[face]] * bary).sum(1)
            view = rays_d[idx] / rays_d[idx].norm(dim=-1, keepdim=True).clamp_min(1e-20)
            color[idx] = shade_pbr(environment[0], environment[1], albedo, rm[:, :1], rm[:, 1:], normal,
                                   view).clamp(0.0, 1.0)
        else:
            color[idx] = shade(albedo, normal, points, light, shading, ambient)
    color = color.view(b, h, s, w, s, 3).mean(dim=(2, 4))
    coverage = hits.hit.float().view(b, h, s, w, s, 1).mean(dim=(2, 4))
    return color + (1.0 - coverage) * background.to(device=device, dtype=color.dtype)
