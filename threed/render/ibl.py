"""Split-sum image-based lighting (Karis 2013), as nvdiffrec and Fantasia3D shade physically based materials.

A surface with albedo a, roughness r and metallic m under an environment L(ω) reflects

    colour = (1 - m) a · E(n) + (F0 · A(n·v, r) + B(n·v, r)) · S(reflect(v, n), r),   F0 = 0.04 (1 - m) + m a

- E(n) = ∫ L(ω) max(0, n·ω) dω / π: the diffuse irradiance (over π, so a white Lambertian surface under a
  constant sky of radiance L shows exactly L);
- S(R, r) = ∫ L(ω) D_r(h) max(0, R·ω) dω / ∫ D_r(h) max(0, R·ω) dω, with h the half vector of R and ω and
  n = v = R assumed: the environment prefiltered with the GGX lobe of roughness r (α = r²), kept as a chain
  of maps of falling resolution and rising roughness (nvdiffrec's spacing: 0.08 .. 0.5 over all but the
  last level, 1.0 at the last) and read between the two nearest levels;
- (A, B): the split sum's second factor, the GGX specular BRDF (height-correlated Smith masking, Schlick's
  Fresnel) integrated over the hemisphere with F0 factored out, a table over (n·v, r) (`brdf_lut`).

Everything is computed here, in PyTorch, on any device: the maps are equirectangular (lat-long) images with
y up, read with bilinear filtering that wraps around in longitude; the prefilters are exact quadratures over
the source map's texels (each texel weighted by its solid angle), not sampled, so a constant environment
stays exactly constant at every level. The environment comes from a Radiance .hdr file (threed/render/hdr.py)
or from `default_environment`, a sky generated in code, and is multiplied by `scale` (Fantasia3D: 2).

Lat-long convention (nvdiffrec's): a direction d maps to u = atan2(d_x, -d_z) / 2π + 1/2, v = acos(d_y) / π,
image row 0 at the top (v = 0, straight up).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.errors import UserError

MIN_ROUGHNESS, MAX_ROUGHNESS = 0.08, 0.5  # roughness of the first and the second-to-last level
DIFFUSE_WIDTH = 32  # longitude texels of the irradiance map (irradiance is smooth: a low order in n)


# -- directions and lat-long maps ---------------------------------------------------------------------

def latlong_directions(height: int, width: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """((H, W, 3) unit directions of the texel centres, (H, W) solid angle of each texel)."""
    theta = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height * math.pi
    phi = ((torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width - 0.5) * 2.0 * math.pi
    st, ct = torch.sin(theta)[:, None], torch.cos(theta)[:, None]
    dirs = torch.stack(torch.broadcast_tensors(st * torch.sin(phi), ct, -st * torch.cos(phi)), dim=-1)
    # exact solid angle of a texel: (cos θ0 - cos θ1) Δφ
    edges = torch.arange(height + 1, device=device, dtype=torch.float64) / height * math.pi
    area = (torch.cos(edges[:-1]) - torch.cos(edges[1:]))[:, None] * (2.0 * math.pi / width)
    return dirs.to(dtype), area.expand(height, width).to(dtype)


def sample_latlong(image: Tensor, directions: Tensor) -> Tensor:
    """Bilinear lookup of an (H, W, C) lat-long map in unit `directions` (..., 3): (..., C). Longitude wraps
    around; latitude clamps at the poles."""
    height, width, channels = image.shape
    d = directions.reshape(-1, 3).to(image.dtype)
    u = torch.atan2(d[:, 0], -d[:, 2]) / (2.0 * math.pi) + 0.5
    v = torch.acos(d[:, 1].clamp(-1.0, 1.0)) / math.pi
    padded = torch.cat([image[:, -1:], image, image[:, :1]], dim=1)  # one wrapped column each side
    x = (2.0 * (u * width + 1.0) / (width + 2.0)) - 1.0
    y = 2.0 * v - 1.0
    grid = torch.stack([x, y], dim=-1)[None, None]  # (1, 1, N, 2)
    out = F.grid_sample(padded.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].T.reshape(*directions.shape[:-1], channels)


def resize_latlong(image: Tensor, height: int, width: int) -> Tensor:
    """An (H, W, C) lat-long map resampled to (height, width): area-averaged when shrinking, bilinear when
    growing."""
    if image.shape[:2] == (height, width):
        return image
    x = image.permute(2, 0, 1)[None]
    shrink = image.shape[0] >= height and image.shape[1] >= width
    x = F.interpolate(x, size=(height, width), mode="area") if shrink else \
        F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).contiguous()


# -- the GGX specular BRDF ----------------------------------------------------------------------------

def ggx_d(n_dot_h: Tensor, alpha: Tensor | float) -> Tensor:
    """GGX (Trowbridge-Reitz) normal distribution D(h), α = roughness²."""
    a2 = torch.as_tensor(alpha, dtype=n_dot_h.dtype, device=n_dot_h.device) ** 2
    return a2 / (math.pi * (n_dot_h * n_dot_h * (a2 - 1.0) + 1.0) ** 2)


def smith_g2(n_dot_v: Tensor, n_dot_l: Tensor, alpha: Tensor | float) -> Tensor:
    """Height-correlated Smith masking-shadowing for GGX (Heitz 2014): 1 / (1 + Λ(v) + Λ(l))."""
    a2 = torch.as_tensor(alpha, dtype=n_dot_v.dtype, device=n_dot_v.device) ** 2

    def lam(c: Tensor) -> Tensor:
        c2 = c.clamp_min(1e-7) ** 2
        return 0.5 * (torch.sqrt(1.0 + a2 * (1.0 - c2) / c2) - 1.0)

    return 1.0 / (1.0 + lam(n_dot_v) + lam(n_dot_l))


def hammersley(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(n, 2) points of the Hammersley set in [0, 1)²: i/n and the base-2 radical inverse of i."""
    i = torch.arange(n, dtype=torch.int64)
    bits = torch.zeros(n, dtype=torch.float64)
    scale, k = 0.5, i.clone()
    while bool((k > 0).any()):
        bits += (k & 1).to(torch.float64) * scale
        k >>= 1
        scale *= 0.5
    return torch.stack([(i.to(torch.float64) + 0.5) / n, bits], dim=-1).to(dtype)


@lru_cache(maxsize=4)
def _brdf_lut_cpu(size: int, samples: int) -> Tensor:
    nv = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # texel centres in n·v (columns)
    rough = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # ... and roughness (rows)
    xi = hammersley(samples)
    out = torch.empty(size, size, 2, dtype=torch.float64)
    sin_v = torch.sqrt(1.0 - nv * nv)
    for row, r in enumerate(rough.tolist()):
        alpha = r * r
        # GGX importance sampling of the half vector around n = z (pdf of h: D(h) n·h)
        phi = 2.0 * math.pi * xi[:, 0]
        cos_h = torch.sqrt((1.0 - xi[:, 1]) / (1.0 + (alpha * alpha - 1.0) * xi[:, 1]))
        sin_h = torch.sqrt(1.0 - cos_h * cos_h)
        h = torch.stack([sin_h * torch.cos(phi), sin_h * torch.sin(phi), cos_h], dim=-1)  # (S, 3)
        # v in the xz-plane at each n·v: v·h and l = 2 (v·h) h - v
        v_dot_h = sin_v[:, None] * h[None, :, 0] + nv[:, None] * h[None, :, 2]  # (N, S)
        n_dot_l = 2.0 * v_dot_h * h[None, :, 2] - nv[:, None]
        valid = (n_dot_l > 0) & (v_dot_h > 0)
        g = smith_g2(nv[:, None].expand_as(n_dot_l), n_dot_l.clamp_min(1e-7), alpha)
        # estimator of ∫ f cos dω / F with l drawn from D(h) n·h / (4 v·h): G v·h / (n·h n·v) (4 cancels)
        weight = torch.where(valid, g * v_dot_h / (h[None, :, 2] * nv[:, None]), torch.zeros_like(g))
        fc = (1.0 - v_dot_h.clamp(0.0, 1.0)) ** 5
        out[row, :, 0] = ((1.0 - fc) * weight).mean(dim=1)
        out[row, :, 1] = (fc * weight).mean(dim=1)
    return out.to(torch.float32)


def brdf_lut(size: int = 128, samples: int = 1024, device: torch.device | str = "cpu") -> Tensor:
    """The split sum's BRDF table: (size, size, 2), row = roughness, column = n·v (texel centres), holding
    (A, B) with ∫ f_GGX(l, v) (n·l) dl = F0 · A + B for Schlick's F = F0 + (1 - F0)(1 - v·h)^5. Computed once
    per (size, samples) by GGX importance sampling over a Hammersley set (128², 1024 samples: about a second
    on a CPU) and cached."""
    return _brdf_lut_cpu(int(size), int(samples)).to(device)


def lookup_brdf(lut: Tensor, n_dot_v: Tensor, roughness: Tensor) -> Tensor:
    """Bilinear (A, B) from `brdf_lut`'s table at (n·v, roughness) (..., 1) each, clamped to the table."""
    shape = n_dot_v.shape[:-1]
    grid = torch.stack([n_dot_v.reshape(-1) * 2.0 - 1.0, roughness.reshape(-1) * 2.0 - 1.0], dim=-1)
    grid = grid.clamp(-1.0, 1.0).to(lut.dtype)[None, None]
    out = F.grid_sample(lut.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0].T.reshape(*shape, 2)


# -- the environment ----------------------------------------------------------------------------------

def _filter(source: Tensor, height: int, width: int, lobe, chunk: int = 1024) -> Tensor:
    """Each texel of an (height, width) output map: the `source` map (its own size) weighted by
    lobe(cos between the output direction and each source texel) times that texel's solid angle, normalised."""
    src_dirs, src_area = latlong_directions(*source.shape[:2], device=source.device)
    out_dirs, _ = latlong_directions(height, width, device=source.device)
    src_dirs, src_area = src_dirs.reshape(-1, 3), src_area.reshape(-1)
    values = source.reshape(-1, source.shape[-1])
    out_dirs = out_dirs.reshape(-1, 3)
    out = torch.empty(out_dirs.shape[0], source.shape[-1], device=source.device, dtype=source.dtype)
    for start in range(0, out_dirs.shape[0], chunk):
        cos = out_dirs[start:start + chunk] @ src_dirs.T
        w = lobe(cos) * src_area
        out[start:start + chunk] = (w @ values) / w.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return out.reshape(height, width, -1)


def level_roughness(levels: int) -> list[float]:
    """Roughness of each level of the specular chain (nvdiffrec's spacing)."""
    if levels < 2:
        raise ValueError("the specular chain needs at least two levels")
    inner = [MIN_ROUGHNESS + (MAX_ROUGHNESS - MIN_ROUGHNESS) * i / max(levels - 2, 1) for i in range(levels - 1)]
    return inner + [1.0]


class EnvironmentLight:
    """An environment map prefiltered for split-sum shading: `specular` (a chain of lat-long maps, level i at
    width / 2^i filtered with the GGX lobe of `roughness[i]`) and `diffuse` (the irradiance over π)."""

    def __init__(self, radiance: Tensor, width: int = 128, min_width: int = 16,
                 device: torch.device | str = "cpu"):
        """`radiance`: (H, W, 3) linear radiance in the lat-long convention (already scaled); `width`: the
        first level's longitude texels (its latitude texels are half), halved down to `min_width`."""
        if radiance.ndim != 3 or radiance.shape[-1] != 3 or min(radiance.shape[:2]) < 1:
            raise ValueError(f"an environment map is (H, W, 3), got {tuple(radiance.shape)}")
        base = radiance.to(device=device, dtype=torch.float32).clamp_min(0.0)
        widths = [int(width)]
        while widths[-1] // 2 >= min_width:
            widths.append(widths[-1] // 2)
        if len(widths) < 2:
            raise ValueError(f"width {width} leaves no room for a chain down to {min_width}")
        self.roughness = level_roughness(len(widths))
        self.specular: list[Tensor] = []
        for w, r in zip(widths, self.roughness):
            alpha = r * r
            source = resize_latlong(base, w // 2, w)
            self.specular.append(_filter(source, w // 2, w,
                                         lambda c, a=alpha: ggx_d(torch.sqrt(((1.0 + c) * 0.5).clamp(0.0, 1.0)), a) * c.clamp_min(0.0)))
        dw = min(DIFFUSE_WIDTH, widths[0])
        self.diffuse = _filter(resize_latlong(base, dw // 2, dw), dw // 2, dw, lambda c: c.clamp_min(0.0))

    def to(self, device: torch.device | str) -> "EnvironmentLight":
        self.specular = [s.to(device) for s in self.specular]
        self.diffuse = self.diffuse.to(device)
        return self

    def mip_level(self, roughness: Tensor) -> Tensor:
        """The (fractional) level of the chain for `roughness`: linear in roughness between the levels'
        own values."""
        r = torch.as_tensor(self.roughness, dtype=roughness.dtype, device=roughness.device)
        x = roughness.clamp(float(r[0]), float(r[-1]))
        upper = torch.searchsorted(r, x.contiguous(), right=False).clamp(1, len(r) - 1)
        lo, hi = r[upper - 1], r[upper]
        return (upper - 1).to(x.dtype) + (x - lo) / (hi - lo)

    def irradiance(self, normal: Tensor) -> Tensor:
        """E(n) / π for unit normals (..., 3): (..., 3)."""
        return sample_latlong(self.diffuse, normal)

    def prefiltered(self, direction: Tensor, roughness: Tensor) -> Tensor:
        """S(R, r) for unit reflection directions (..., 3) and roughness (..., 1): the two nearest levels
        of the chain, blended linearly."""
        level = self.mip_level(roughness)[..., 0]
        out = torch.zeros(*direction.shape[:-1], 3, device=direction.device, dtype=direction.dtype)
        for i, image in enumerate(self.specular):
            weight = (1.0 - (level - i).abs()).clamp_min(0.0)
            used = weight > 0
            if bool(used.any()):
                out[used] = out[used] + weight[used, None] * sample_latlong(image, direction[used])
        return out


def shade_pbr(light: EnvironmentLight, lut: Tensor, albedo: Tensor, roughness: Tensor, metallic: Tensor,
              normal: Tensor, view: Tensor, specular: bool = True) -> Tensor:
    """Split-sum colour (..., 3) (module docstring) of a surface seen along unit `view` directions (..., 3)
    (from the camera toward the surface), unit `normal` (..., 3), albedo (..., 3), roughness and metallic
    (..., 1). `specular` False: the diffuse term alone (a Lambertian surface). Linear radiance, not clamped."""
    diffuse_albedo = (1.0 - metallic) * albedo
    colour = diffuse_albedo * light.irradiance(normal)
    if not specular:
        return colour
    v = -view
    n_dot_v = (normal * v).sum(-1, keepdim=True).clamp(1e-4, 1.0)
    reflected = F.normalize(2.0 * n_dot_v * normal - v, dim=-1)
    ab = lookup_brdf(lut, n_dot_v, roughness)
    f0 = 0.04 * (1.0 - metallic) + metallic * albedo
    return colour + (f0 * ab[..., :1] + ab[..., 1:]) * light.prefiltered(reflected, roughness)


# -- where the environment comes from ----------------------------------------------------------------

def default_environment(height: int = 128, width: int = 256) -> Tensor:
    """An outdoor sky made in code, (H, W, 3) linear radiance (before `scale`): a blue-white sky brightening
    toward the horizon, a warm sun at 40° elevation (a small disc of high radiance with a soft halo), and a
    darker brown-grey ground, so materials show a highlight, a sky reflection and a horizon."""
    dirs, _ = latlong_directions(height, width, dtype=torch.float64)
    y = dirs[..., 1]
    up = y.clamp_min(0.0)
    zenith = torch.tensor([0.35, 0.55, 0.95], dtype=torch.float64)
    horizon = torch.tensor([0.85, 0.88, 0.92], dtype=torch.float64)
    ground = torch.tensor([0.22, 0.19, 0.16], dtype=torch.float64)
    t = (1.0 - up) ** 3
    sky = zenith * (1.0 - t[..., None]) + horizon * t[..., None]
    soil = ground * (0.6 + 0.4 * (1.0 + y.clamp(max=0.0))[..., None])
    image = torch.where((y >= 0)[..., None], sky, soil)
    elevation, azimuth = math.radians(40.0), math.radians(30.0)
    sun = torch.tensor([math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
                        math.cos(elevation) * math.cos(azimuth)], dtype=torch.float64)
    cos = (dirs * sun).sum(-1)
    angle = torch.acos(cos.clamp(-1.0, 1.0))
    disc = (angle < math.radians(3.0)).to(torch.float64) * 40.0
    halo = torch.exp(-(angle / math.radians(12.0)) ** 2) * 1.5
    image = image + (disc + halo)[..., None] * torch.tensor([1.0, 0.92, 0.8], dtype=torch.float64)
    return image.to(torch.float32)


def load_environment(path: str | Path | None = None, scale: float = 2.0) -> Tensor:
    """The environment's (H, W, 3) linear radiance times `scale`: the Radiance .hdr at `path` (an unreadable
    file is one UserError line), else `default_environment`."""
    if path:
        from threed.render.hdr import read_hdr

        image = torch.from_numpy(read_hdr(path))
        if not bool(torch.isfinite(image).all()):
            raise UserError(f"the environment map {path} holds non-finite values: pass a valid .hdr file")
    else:
        image = default_environment()
    return image * float(scale)


@lru_cache(maxsize=2)
def _cached_light(path: str, scale: float, width: int) -> EnvironmentLight:
    return EnvironmentLight(load_environment(path or None, scale), width=width)


def environment_light(path: str | Path | None = None, scale: float = 2.0, width: int = 128,
                      device: torch.device | str = "cpu") -> EnvironmentLight:
    """The prefiltered light for an environment (`load_environment`), built once per (path, scale, width)
    in this process and copied to `device`."""
    light = _cached_light(str(path or ""), float(scale), int(width))
    out = EnvironmentLight.__new__(EnvironmentLight)
    out.roughness, out.specular, out.diffuse = list(light.roughness), list(light.specular), light.diffuse
    return out.to(device)

