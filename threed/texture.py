"""Textured export: decimate, UV-unwrap (xatlas), bake a colour function into a texture, write OBJ/GLB.

A field's albedo is a function of 3D position; a texture is a function of 2D texture coordinates. To
turn one into the other every triangle is given a place in a square atlas (`unwrap`), each texel whose
centre a triangle covers is mapped back to the 3D point it stands for (`uv_coverage` gives the triangle
and barycentrics), and the colour function is evaluated there (`bake_texture`). Texels no triangle
covers are filled from their neighbours (`dilate`, then `push_pull_fill`) so that bilinear filtering
and mipmaps at chart borders never blend in a background colour.

Cost: xatlas's chart computation grows faster than linearly with the face count (measured on 2 CPU
cores, a bumpy closed surface: 5k faces 0.2 s, 20k 1.3 s, 50k 6 s, 100k 22 s, 200k 89 s with
xatlas's defaults; users report an hour on multi-million-face meshes), so meshes are decimated first and the
chart area is bounded (see `unwrap`). Baking and writing are linear in texels and faces.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from exporters.arrays import uv_mesh_arrays
from threed.errors import UserError

AlbedoFn = Callable[[Tensor], Tensor]  # (N, 3) points -> (N, 3) colours in [0, 1]
MaterialFn = Callable[[Tensor], Tensor]  # (N, 3) points -> (N, 5) albedo, roughness, metallic in [0, 1]

TEXTURE_FORMATS = ("obj", "glb")
MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE = 16, 16384


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or not MIN_TEXTURE_SIZE <= size <= MAX_TEXTURE_SIZE:
        raise UserError(f"texture size must be an integer in [{MIN_TEXTURE_SIZE}, {MAX_TEXTURE_SIZE}], got "
                        f"{size!r}: pass e.g. 1024")
    return int(size)


def _triangle_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    v = vertices.astype(np.float64)
    cross = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    return float(0.5 * np.linalg.norm(cross, axis=1).sum())


def unwrap(vertices: np.ndarray, faces: np.ndarray, resolution: int = 1024, padding: int = 2,
           max_chart_area: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UV atlas of a triangle mesh with xatlas: (vmapping (N',), new_faces (M, 3), uvs (N', 2)).

    xatlas cuts the surface into charts, flattens each and packs them into one atlas, whose sides are
    then scaled to the unit square (they differ by up to ~30%: texels are slightly anisotropic). Vertices
    on a cut are split: new vertex i is original vertex `vmapping[i]` with texture coordinate `uvs[i]`
    (in [0, 1], v up as in OBJ), and `new_faces` index the new vertices (`vmapping[new_faces]` are the
    original faces). `resolution` is the texture size the charts are packed for and `padding` the texels
    kept free around each chart at that size.

    Run time is bounded by three options. `max_chart_area` (a fraction of the surface area; 0 = no
    bound) stops a chart from growing past that area: growing charts is where xatlas spends its time
    (packing options barely changed it). On a bumpy test surface on a shared 2-core CPU it cut a
    50k-face unwrap from 6.0 s to 1.8 s, 100k from 22 s to 5.8 s and 200k from 89 s to 24 s, at the cost
    of atlas utilisation (0.72 to 0.61 at 50k); docs/PERFORMANCE.md has the benchmark's table. Chart growing runs
    for one iteration (`max_iterations=1`) and packing places charts greedily (`bruteForce=False`):
    both are xatlas's defaults and are set explicitly because their alternatives multiply the cost.
    The face count itself is bounded by decimating first (`export_textured`'s `max_faces`).
    """
    try:
        import xatlas
    except ImportError as e:  # pragma: no cover - xatlas is a dependency
        raise UserError("textured export needs xatlas: pip install xatlas") from e

    vertices = np.ascontiguousarray(vertices, dtype=np.float32).reshape(-1, 3)
    faces = np.ascontiguousarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise UserError("cannot texture an empty mesh (no faces): check the mesh extraction's level")
    charts = xatlas.ChartOptions()
    charts.max_iterations = 1
    if max_chart_area > 0:
        charts.max_chart_area = float(max_chart_area * _triangle_area(vertices, faces))
    pack = xatlas.PackOptions()
    pack.bruteForce = False
    pack.resolution = int(resolution)  # texels_per_unit stays 0: estimated so the charts fill one atlas
    pack.padding = int(padding)
    pack.bilinear = True
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces.astype(np.uint32))
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases, expected one")
    vmapping, new_faces, uvs = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uvs.astype(np.float32)


def uv_coverage(triangles: Tensor, width: int, height: int,
                max_candidates: int = 1 << 21) -> tuple[Tensor, Tensor, Tensor]:
    """Texels whose centres lie inside 2D triangles: (texel (K,), triangle (K,), barycentrics (K, 3)).

    triangles: (M, 3, 2) in texel units, x right and y down, so texel (row r, column c) has its centre
    at (c + 0.5, r + 0.5) and index r * width + c. A triangle covers the texel centres inside it or on
    its edges (within 1e-6 texel, so a centre on an edge shared by two triangles is never missed); a
    texel covered by several triangles is given to the one listed last. Barycentrics weight the three
    corners (they reproduce the centre). Either winding works; degenerate triangles cover nothing.

    Vectorised: every triangle's bounding box of texel centres is enumerated as flat candidates and
    tested with the three edge functions at once, `max_candidates` at a time (memory stays bounded
    however large a triangle is).
    """
    tri = triangles.detach().to(torch.float64).reshape(-1, 3, 2)
    device = tri.device
    empty = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device),
             torch.zeros(0, 3, dtype=torch.float64, device=device))
    if len(tri) == 0:
        return empty
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    lo, hi = tri.amin(dim=1), tri.amax(dim=1)
    # Texel centres k + 0.5 inside [lo, hi]: k from ceil(lo - 0.5) to floor(hi - 0.5), clipped to the image.
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    nx, ny = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    counts = torch.where(area2.abs() > 1e-12, nx * ny, torch.zeros_like(nx))
    ids = counts.nonzero().squeeze(1)
    if len(ids) == 0:
        return empty
    # Edge i is the one opposite corner i. Its edge function, divided by the edge's length and signed by
    # the winding, is a line equation A x + B y + C giving a point's distance from the edge, positive on
    # the triangle's side; times length / |2 area| it is corner i's barycentric coordinate.
    corners = torch.stack([a, b, c], dim=1)
    starts, ends = corners[:, [1, 2, 0]], corners[:, [2, 0, 1]]
    direction = ends - starts
    lengths = direction.norm(dim=-1).clamp(min=1e-300)
    sign = torch.sign(area2)[:, None]
    A = -direction[..., 1] * sign / lengths
    B = direction[..., 0] * sign / lengths
    C = -(A * starts[..., 0] + B * starts[..., 1])
    lines = torch.stack([A, B, C], dim=-1)  # (M, 3 edges, 3 coefficients)
    to_bary = lengths / area2.abs()[:, None]  # (M, 3)

    texels, owners, barys = [], [], []
    cumulative = torch.cumsum(counts[ids], 0)
    total = int(cumulative[-1])
    for start in range(0, total, max_candidates):
        candidate = torch.arange(start, min(start + max_candidates, total), device=device)
        k = torch.searchsorted(cumulative, candidate, right=True)  # which listed triangle
        face = ids[k]
        local = candidate - (cumulative[k] - counts[face])
        col = x0[face] + local % nx[face]
        row = y0[face] + local // nx[face]
        line = lines[face]  # (K, 3 edges, 3)
        distance = line[..., 0] * (col.double() + 0.5)[:, None] + line[..., 1] * (row.double() + 0.5)[:, None] \
            + line[..., 2]
        inside = (distance >= -1e-6).all(dim=1)
        face = face[inside]
        bary = (distance[inside] * to_bary[face]).clamp(min=0.0)
        texels.append(row[inside] * width + col[inside])
        owners.append(face)
        barys.append(bary / bary.sum(dim=1, keepdim=True).clamp(min=1e-300))
    texel, owner, bary = torch.cat(texels), torch.cat(owners), torch.cat(barys)
    order = torch.arange(len(texel), device=device)
    last_one = torch.full((width * height,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, texel, order, reduce="amax")
    keep = last_one[texel] == order
    return texel[keep], owner[keep], bary[keep]


def _box3(x: Tensor) -> Tensor:
    """Sum over each texel's 3x3 neighbourhood (zeros outside) of a (C, H, W) tensor, as two separable
    passes of shifted adds: several times faster on a CPU than a 3x3 pooling or convolution."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]


def dilate(image: Tensor, mask: Tensor, rings: int) -> tuple[Tensor, Tensor]:
    """Grow the filled region `rings` texels: each empty texel next to filled ones takes their mean.

    image: (H, W, C) float; mask: (H, W) bool, True where filled. Returns the new image and mask. This
    is what bilinear filtering at a chart's border reads, so those texels get the border's own colours.
    """
    out = image.permute(2, 0, 1).clone()
    mask = mask.clone()
    for _ in range(int(rings)):
        weight = mask.to(out.dtype)
        sums, counts = _box3(out * weight), _box3(weight[None])[0]
        grow = (~mask) & (counts > 0)
        if not bool(grow.any()):
            break
        out = torch.where(grow, sums / counts.clamp(min=1e-12), out)
        mask |= grow
    return out.permute(1, 2, 0), mask


def push_pull_fill(image: Tensor, mask: Tensor) -> Tensor:
    """Fill every empty texel with a smooth extension of the filled ones (push-pull).

    Push: average the filled texels down a pyramid of 2x2 blocks until one texel is left. Pull: from the
    coarsest level up, an empty texel takes the bilinearly upsampled colour of the level below. A few
    dozen full-image passes in all; afterwards no mip level of the texture averages in a background.
    image: (H, W, C) float; mask: (H, W) bool. Filled texels are returned unchanged.
    """
    if not bool(mask.any()):
        return image
    weighted = (image.permute(2, 0, 1) * mask.to(image.dtype))[None]
    weight = mask.to(image.dtype)[None, None]
    levels = [(weighted, weight)]
    while max(weight.shape[-2:]) > 1:
        weighted = F.avg_pool2d(weighted, 2, ceil_mode=True)
        weight = F.avg_pool2d(weight, 2, ceil_mode=True)
        levels.append((weighted, weight))
    colour = None
    for weighted, weight in reversed(levels):
        mean = weighted / weight.clamp(min=1e-12)
        if colour is not None:
            up = F.interpolate(colour, size=mean.shape[-2:], mode="bilinear", align_corners=False)
            mean = torch.where(weight > 0, mean, up)
        colour = mean
    filled = colour[0].permute(1, 2, 0)
    return torch.where(mask[..., None], image, filled)


@torch.no_grad()
def bake_texture(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, uv_faces: np.ndarray | None,
                 albedo_fn: AlbedoFn, size: int = 1024, device: str | torch.device = "cpu",
                 progress: bool = True, *, gutter: int = 8, inset: float = 0.0,
                 normals: np.ndarray | None = None, chunk: int = 1 << 18, channels: int = 3) -> np.ndarray:
    """An (size, size, channels) uint8 texture whose texels hold `albedo_fn` at the surface points they map
    to (`channels` values in [0, 1] per point: 3 for a colour, 5 for a material's albedo, roughness, metallic).

    vertices (N, 3) and faces (M, 3) give the surface; uvs (T, 2) in [0, 1] (v up, image row 0 is
    v = 1) and uv_faces (M, 3) give each face's texture coordinates (None: uvs are per vertex and
    indexed by `faces`). albedo_fn maps (K, 3) points on `device` to (K, 3) colours in [0, 1]; it is
    called in chunks of `chunk` points (large: threed's hash-grid field on a CPU answered 262k points
    1.6x faster in one call than in 65k chunks). `inset` moves each point that far against the interpolated
    vertex normal (`normals`, or computed) before the lookup: a density field's albedo is trained on
    the dense side of its surface. Texels outside every chart are filled: `gutter` rings of
    neighbour means, then push-pull for the rest (see `dilate`, `push_pull_fill`). Both are needed:
    push-pull alone blends the neighbouring chart's colours into a chart's border (colour error at
    vertices up to 0.50 on a test sphere, against 0.020 with the rings); the rings alone leave the far
    background for coarse mip levels to average in. Eight rings cover the footprint of mip level 3.
    """
    size = _check_size(size)
    vertices, faces, uvs, uv_faces, normals = uv_mesh_arrays(vertices, faces, uvs, uv_faces, normals)
    if len(faces) == 0:
        raise UserError("cannot bake a texture for an empty mesh (no faces)")

    corner_uv = torch.from_numpy(uvs[uv_faces]).to(device)  # (M, 3, 2)
    pixels = torch.stack([corner_uv[..., 0] * size, (1.0 - corner_uv[..., 1]) * size], dim=-1)
    texel, face, bary = uv_coverage(pixels, size, size)
    if len(texel) == 0:
        raise UserError("the UV atlas covers no texel centre: pass a larger texture size")

    v = torch.from_numpy(vertices).to(device)
    f = torch.from_numpy(faces).to(device)
    weights = bary.to(torch.float32)[..., None]
    points = (v[f[face]] * weights).sum(dim=1)  # (K, 3)
    if inset:
        from threed.mesh import vertex_normals

        n = torch.from_numpy(vertex_normals(vertices, faces) if normals is None else normals).to(device)
        direction = F.normalize((n[f[face]] * weights).sum(dim=1), dim=-1)
        points = points - float(inset) * direction

    colours = torch.empty(len(points), channels, dtype=torch.float32, device=device)
    with tqdm(total=len(points), desc="bake texture", unit="texel", unit_scale=True, leave=False,
              disable=not progress) as bar:
        for start in range(0, len(points), chunk):
            out = albedo_fn(points[start:start + chunk])
            colours[start:start + chunk] = out.reshape(-1, channels).float().clamp(0.0, 1.0)
            bar.update(min(chunk, len(points) - start))

    image = torch.zeros(size * size, channels, dtype=torch.float32, device=device)
    mask = torch.zeros(size * size, dtype=torch.bool, device=device)
    image[texel] = colours
    mask[texel] = True
    image, mask = image.reshape(size, size, channels), mask.reshape(size, size)
    image, mask = dilate(image, mask, gutter)
    image = push_pull_fill(image, mask)
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()


def export_textured(vertices: np.ndarray, faces: np.ndarray, albedo_fn: AlbedoFn, out_dir: Path | str,
                    formats: Iterable[str] = TEXTURE_FORMATS, texture_size: int = 1024,
                    max_faces: int = 50000, device: str | torch.device = "cpu", progress: bool = True, *,
                    name: str = "mesh", inset: float = 0.0, max_chart_area: float = 0.02,
                    padding: int = 2, timings: dict[str, float] | None = None,
                    material_fn: MaterialFn | None = None) -> list[Path]:
    """Decimate to at most `max_faces`, unwrap, bake `albedo_fn` and write `name`.obj/.mtl/.png and/or
    `name`.glb into `out_dir`; returns the paths written. With `material_fn` (a physically based material)
    that is baked instead, in the same pass, into the albedo texture and a metallic-roughness texture
    (glTF's packing: roughness in G, metallic in B): the GLB's metallicRoughnessTexture, and the OBJ's
    roughness and metallic maps.

    50k faces by default: xatlas then takes 2-8 s on a shared 2-core CPU (see `unwrap`; with its
    defaults 6-22 s, and it grows about quadratically beyond), and a 1024^2 texture still gives each
    triangle about 10 texels (half the texels are covered on a bumpy test surface). Vertex normals are
    computed on the decimated mesh before the seams are cut, so shading does not break along them.
    `timings`, when given, receives each phase's wall time in seconds (decimate, unwrap, bake, write).
    """
    from exporters.textured_glb import write_textured_glb
    from exporters.textured_obj import write_textured_obj
    from threed.mesh import _compact, decimate, vertex_normals

    formats = list(dict.fromkeys(str(fmt).lower().lstrip(".") for fmt in formats))
    unknown = [fmt for fmt in formats if fmt not in TEXTURE_FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown textured export format {', '.join(unknown) or '(none)'}: choose from "
                        f"{', '.join(TEXTURE_FORMATS)}")
    _check_size(texture_size)
    if int(max_faces) < 4:
        raise UserError(f"max_faces must be at least 4, got {max_faces}: pass e.g. 50000")
    vertices = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise UserError("cannot texture an empty mesh (no faces): check the mesh extraction's level")

    out_dir = Path(out_dir)
    timings = {} if timings is None else timings
    clock = time.perf_counter()

    def done(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[phase] = now - clock
        clock = now
        steps.update()

    steps = tqdm(total=4, desc="textured export", unit="step", disable=not progress)
    steps.set_postfix_str(f"decimate {len(faces)} -> {min(len(faces), int(max_faces))} faces")
    vertices, faces = _compact(*decimate(vertices, faces, int(max_faces)))
    normals = vertex_normals(vertices, faces)
    done("decimate")
    # One opaque xatlas call (its Python binding has no progress callback and holds the GIL).
    steps.set_postfix_str(f"unwrap {len(faces)} faces (xatlas)")
    vmapping, uv_faces, uvs = unwrap(vertices, faces, texture_size, padding, max_chart_area)
    welded = vmapping[uv_faces]
    done("unwrap")
    steps.set_postfix_str(f"bake {texture_size}x{texture_size}")
    baked = bake_texture(vertices, welded, uvs, uv_faces, material_fn or albedo_fn, texture_size, device,
                         progress, inset=inset, normals=normals, channels=5 if material_fn else 3)
    image, metallic_roughness = baked[..., :3], None
    if material_fn is not None:
        metallic_roughness = np.concatenate([np.full_like(baked[..., :1], 255), baked[..., 3:5]], axis=-1)
    done("bake")
    steps.set_postfix_str("write " + ", ".join(formats))
    written: list[Path] = []
    if "obj" in formats:
        written += write_textured_obj(out_dir / f"{name}.obj", vertices, welded, uvs, image, normals, uv_faces,
                                      metallic_roughness=metallic_roughness)
    if "glb" in formats:
        written.append(write_textured_glb(out_dir / f"{name}.glb", vertices[vmapping], uv_faces, uvs, image,
                                          normals[vmapping], metallic_roughness=metallic_roughness))
    done("write")
    steps.close()
    return written
