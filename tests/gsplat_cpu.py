"""gsplat's `rasterization()` on a CPU, for tests: gsplat's own Python entry point runs as released, with the CUDA
primitives it calls replaced by PyTorch code (any other one fails the test instead of building gsplat's kernels).

- Projection: gsplat's PyTorch reference (`gsplat.cuda._torch_impl._fully_fused_projection`), with the radii its
  CUDA kernel (ProjectionEWA3DGSFused.cu) gives when it is passed the opacities: the extent min(3.33,
  sqrt(2 ln(255 o))) standard deviations per axis, a Gaussian with o < 1/255 culled, and the kernel's
  outside-the-image rule.
- Tile intersection and offsets: the same pairs, ids and order as gsplat's PyTorch reference (`_isect_tiles`, a
  Python loop per Gaussian; this one is vectorised and checked equal to it in tests/test_splat_gsplat.py), and
  its `_isect_offset_encode`.
- Spherical harmonics: gsplat's PyTorch reference (`_spherical_harmonics`).
- Compositing: a transcription of the forward kernel (RasterizeToPixels3DGSFwd.cu), per 16-pixel tile over its
  depth-sorted list: α = min(0.999, o e^{-σ}), skipped when σ < 0 or α < 1/255, the pixel done before the
  Gaussian that would take T to 1e-4 or below; the backward pass is autograd's.

What this cannot check is gsplat's CUDA code itself (its kernels, fast exponentials, float32 atomics): that is
tests/test_splat_gsplat.py's CUDA test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

gsplat = pytest.importorskip("gsplat")
import gsplat.cuda._wrapper  # noqa: E402  (after the skip: gsplat is an optional extra)
import gsplat.rendering  # noqa: E402
from gsplat.cuda import _torch_impl as reference  # noqa: E402

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's csrc/include/Common.h
ALPHA_CLAMP = 0.999  # gsplat <= 1.5.3's kernels
DONE_T = 1e-4


def fully_fused_projection(means: Tensor, covars: Tensor | None, quats: Tensor, scales: Tensor, viewmats: Tensor,
                           Ks: Tensor, width: int, height: int, eps2d: float = 0.3, near_plane: float = 0.01,
                           far_plane: float = 1e10, radius_clip: float = 0.0, packed: bool = False,
                           sparse_grad: bool = False, calc_compensations: bool = False,
                           camera_model: str = "pinhole", opacities: Tensor | None = None):
    assert covars is None and not packed and not calc_compensations and camera_model == "pinhole"
    covars, _ = reference._quat_scale_to_covar_preci(quats, scales, True, False, triu=False)
    _, means2d, depths, conics, _ = reference._fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane)
    with torch.no_grad():
        a, b, c = conics.unbind(-1)
        det = a * c - b * b  # the conic is the inverse 2-D covariance: its diagonal is (c, a) / det
        extend = torch.full_like(depths, 3.33)
        valid = (depths > near_plane) & (depths < far_plane)
        if opacities is not None:
            o = torch.broadcast_to(opacities[None], depths.shape)
            valid &= o >= ALPHA_THRESHOLD
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log((o / ALPHA_THRESHOLD).clamp_min(1.0))))
        radius = torch.stack([torch.ceil(extend * torch.sqrt(c / det)), torch.ceil(extend * torch.sqrt(a / det))], -1)
        valid &= ~((radius[..., 0] <= radius_clip) & (radius[..., 1] <= radius_clip))
        outside = ((means2d[..., 0] + radius[..., 0] <= 0) | (means2d[..., 0] - radius[..., 0] >= width)
                   | (means2d[..., 1] + radius[..., 1] <= 0) | (means2d[..., 1] - radius[..., 1] >= height))
        radii = torch.where((valid & ~outside)[..., None], radius, torch.zeros_like(radius)).int()
    return radii, means2d, depths, conics, None


@torch.no_grad()
def isect_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_width: int, tile_height: int,
                sort: bool = True, segmented: bool = False, packed: bool = False, n_images: int | None = None,
                image_ids: Tensor | None = None, gaussian_ids: Tensor | None = None):
    """gsplat's `_isect_tiles` without its per-Gaussian Python loop: every (image, tile, Gaussian) whose tile
    rectangle the radii reach, keyed (image | tile | depth's float32 bits) and sorted."""
    assert not packed
    image_dims, n = means2d.shape[:-2], means2d.shape[-2]
    images = math.prod(image_dims)
    m, r, d = means2d.reshape(images, n, 2), radii.reshape(images, n, 2), depths.reshape(images, n)
    lo = torch.floor(m / tile_size - r / tile_size).int()
    hi = torch.ceil(m / tile_size + r / tile_size).int()
    limits = torch.tensor([tile_width, tile_height], dtype=torch.int32)
    lo, hi = torch.minimum(lo.clamp_min(0), limits), torch.minimum(hi.clamp_min(0), limits)
    counts = (hi - lo).prod(-1) * (r > 0).all(-1)
    flat = counts.flatten()
    owner = torch.repeat_interleave(torch.arange(images * n), flat)  # image * n + gaussian, per pair
    rank = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(flat, 0) - flat, flat)
    span = (hi - lo).reshape(-1, 2)[owner]
    tile_x = lo.reshape(-1, 2)[owner, 0] + rank % span[:, 0]
    tile_y = lo.reshape(-1, 2)[owner, 1] + torch.div(rank, span[:, 0], rounding_mode="floor")
    tile_bits = (tile_width * tile_height).bit_length()
    depth_bits = d.float().contiguous().view(torch.int32).flatten()[owner].long() & 0xFFFFFFFF
    ids = ((torch.div(owner, n, rounding_mode="floor") << tile_bits) | (tile_y * tile_width + tile_x)) << 32
    ids = ids | depth_bits
    flatten_ids = owner.int()
    if sort:
        ids, order = torch.sort(ids, stable=True)
        flatten_ids = flatten_ids[order]
    return counts.reshape(image_dims + (n,)).int(), ids, flatten_ids


def isect_offset_encode(isect_ids: Tensor, n_images: int, tile_width: int, tile_height: int) -> Tensor:
    return reference._isect_offset_encode(isect_ids, n_images, tile_width, tile_height)


def rasterize_to_pixels(means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, image_width: int,
                        image_height: int, tile_size: int, isect_offsets: Tensor, flatten_ids: Tensor,
                        backgrounds: Tensor | None = None, masks: Tensor | None = None, packed: bool = False,
                        absgrad: bool = False) -> tuple[Tensor, Tensor]:
    assert not packed and masks is None and not absgrad
    image_dims, n, channels = means2d.shape[:-2], means2d.shape[-2], colors.shape[-1]
    images = math.prod(image_dims)
    m, con = means2d.reshape(images * n, 2), conics.reshape(images * n, 3)
    col, op = colors.reshape(images * n, channels), opacities.reshape(images * n)
    offsets = isect_offsets.reshape(images, -1).flatten().tolist() + [len(flatten_ids)]
    tiles_y, tiles_x = isect_offsets.shape[-2:]
    out = colors.new_zeros(images, image_height, image_width, channels)
    alpha_out = colors.new_zeros(images, image_height, image_width, 1)
    for tile, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        image, ty, tx = tile // (tiles_y * tiles_x), (tile // tiles_x) % tiles_y, tile % tiles_x
        rows = torch.arange(ty * tile_size, min((ty + 1) * tile_size, image_height))
        cols = torch.arange(tx * tile_size, min((tx + 1) * tile_size, image_width))
        if len(rows) == 0 or len(cols) == 0:
            continue
        py, px = torch.meshgrid(rows.to(m.dtype) + 0.5, cols.to(m.dtype) + 0.5, indexing="ij")
        g = flatten_ids[start:end].long()
        if len(g) == 0:
            if backgrounds is not None:
                out[image, rows[:, None], cols[None, :]] = backgrounds.reshape(images, channels)[image]
            continue
        dx = m[g, 0][None] - px.reshape(-1, 1)  # (pixels, Gaussians in depth order)
        dy = m[g, 1][None] - py.reshape(-1, 1)
        sigma = 0.5 * (con[g, 0] * dx * dx + con[g, 2] * dy * dy) + con[g, 1] * dx * dy
        alpha = torch.clamp_max(op[g] * torch.exp(-sigma), ALPHA_CLAMP)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
        with torch.no_grad():  # the kernel stops a pixel before the Gaussian that takes T to DONE_T or below
            alive = torch.cumprod(1.0 - alpha, dim=1) > DONE_T
        alpha = torch.where(alive, alpha, torch.zeros_like(alpha))
        keep = torch.cumprod(1.0 - alpha, dim=1)
        transmittance = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1)
        pixel = (alpha * transmittance) @ col[g]
        final_t = keep[:, -1:]
        if backgrounds is not None:
            pixel = pixel + final_t * backgrounds.reshape(images, channels)[image]
        out[image, rows[:, None], cols[None, :]] = pixel.reshape(len(rows), len(cols), channels)
        alpha_out[image, rows[:, None], cols[None, :]] = (1.0 - final_t).reshape(len(rows), len(cols), 1)
    return out.reshape(image_dims + out.shape[1:]), alpha_out.reshape(image_dims + alpha_out.shape[1:])


def spherical_harmonics(degrees_to_use: int, dirs: Tensor, coeffs: Tensor, masks: Tensor | None = None) -> Tensor:
    colors = reference._spherical_harmonics(degrees_to_use, dirs, coeffs)
    return colors if masks is None else colors * masks[..., None]  # the kernel leaves masked-out ones at 0


def _no_cuda(name: str):
    raise AssertionError(f"gsplat's CUDA primitive {name!r} was reached on a CPU: give it a stand-in here")


def use_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run gsplat's `rasterization()` on CPU tensors for the rest of the test, and let threed's gsplat backend
    (threed/render/splat_gsplat.py) reach it there. Any other CUDA primitive gsplat calls fails the test at
    once rather than trying to build gsplat's kernels."""
    from threed.render import splat_gsplat

    for name in ("fully_fused_projection", "isect_tiles", "isect_offset_encode", "rasterize_to_pixels",
                 "spherical_harmonics"):
        monkeypatch.setattr(gsplat.rendering, name, globals()[name])
    monkeypatch.setattr(gsplat.cuda._wrapper, "_make_lazy_cuda_func", _no_cuda)
    monkeypatch.setattr(gsplat.cuda._wrapper, "_make_lazy_cuda_obj", _no_cuda)
    monkeypatch.setattr(splat_gsplat, "gsplat_module", lambda device: gsplat)
