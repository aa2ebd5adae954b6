"""3D Gaussian splatting in plain PyTorch, with the conventions of 3DGS (Kerbl et al. 2023) and gsplat.

Each Gaussian (mean μ, covariance Σ = R S Sᵀ Rᵀ from a quaternion and per-axis scales, opacity o, colour c)
is projected by the EWA approximation (Zwicker et al. 2002): in camera coordinates t = W μ + w, the
perspective map's Jacobian J at t (its x/z and y/z clamped to 1.3 times the half field of view, as both
implementations do) gives the image-plane covariance Σ' = J W Σ Wᵀ Jᵀ + 0.3 I, the 0.3 pixel² dilation
that keeps every splat at least about a pixel wide. Its 3σ radius is ceil(3 √λ_max); Gaussians nearer than
`near` or off the image are culled (radius 0).

A pixel p composites the Gaussians covering it front to back, sorted by camera depth:
    α_i = min(0.99, o_i exp(-½ (p - μ'_i)ᵀ Σ'_i⁻¹ (p - μ'_i))),  skipped when α_i < 1/255,
    C = Σ_i c_i α_i T_i + T_final · background,   T_i = Π_{j<i} (1 - α_j),
stopping before the Gaussian that would take T below 1e-4. Which Gaussians a pixel considers is decided per
block of pixels from the 3σ boxes, as the CUDA kernels decide it per 16x16 tile (the default block is that
tile). Of those pairs only the ones that contribute are evaluated with gradients (`rasterize`): a pixel
near enough for α ≥ 1/255 and not yet stopped; the others add nothing to the sum above, so the image and its
gradients are those of the dense evaluation (tests/test_splat.py checks it), at a cost that grows with the
pairs that matter rather than with pixels x Gaussians. No tile lists, no custom kernels: autograd
differentiates everything, in any dtype (the tests check the gradients in float64).

Image conventions are `threed.cameras.Cameras.rays()`'s: OpenGL camera (looking along -z, y up), square
pixels, focal 0.5 H / tan(fovy / 2), pixel (col i, row j) centred at (i + 0.5, j + 0.5), row 0 at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_MAX = 0.99  # an opaque splat still lets 1% through: the gradient reaches what lies behind it
ALPHA_MIN = 1.0 / 255.0  # contributions below one 8-bit level are skipped
T_MIN = 1e-4  # a pixel stops once its transmittance would fall below this
DILATION = 0.3  # pixel² added to the projected covariance's diagonal (the low-pass filter)
SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 √π)


def sh0_to_rgb(f_dc: Tensor) -> Tensor:
    """Colours of degree-0 spherical-harmonic coefficients (3DGS: 0.5 + C0 f, clamped below at 0)."""
    return (SH_C0 * f_dc + 0.5).clamp_min(0.0)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    return (rgb - 0.5) / SH_C0


def quaternion_to_rotation(q: Tensor) -> Tensor:
    """(N, 4) quaternions (w, x, y, z), normalised here -> (N, 3, 3) rotation matrices."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)


def covariance_3d(scales: Tensor, quaternions: Tensor) -> Tensor:
    """(N, 3, 3) world covariances R S Sᵀ Rᵀ from (N, 3) scales (standard deviations) and (N, 4) quaternions."""
    m = quaternion_to_rotation(quaternions) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


@dataclass
class Projected:
    """One view's projected Gaussians (N each): pixel means, conics (a, b, c) of Σ'⁻¹ = [[a, b], [b, c]],
    camera depths, 3σ radii in pixels (0: culled)."""

    means2d: Tensor  # (N, 2) pixels (x right, y down)
    conics: Tensor  # (N, 3)
    depths: Tensor  # (N,)
    radii: Tensor  # (N,) long


def project(means: Tensor, covariances: Tensor, w2c: Tensor, focal: float, width: int, height: int,
            near: float = 0.01) -> Projected:
    """EWA projection of (N, 3) means and (N, 3, 3) covariances through a camera (`w2c`, (4, 4), OpenGL
    camera frame) with a square-pixel `focal` (pixels) and the principal point at the image's centre."""
    rot, trans = w2c[:3, :3], w2c[:3, 3]
    t = means @ rot.T + trans  # camera coordinates; visible points have z < 0
    depth = -t[:, 2]
    safe = torch.where(depth > near, depth, torch.full_like(depth, 1.0))  # culled points: any finite value
    tan_x, tan_y = 0.5 * width / focal, 0.5 * height / focal
    # the Jacobian's x/z and y/z clamped to 1.3 x the half field of view (3DGS, gsplat): splats far outside
    # the view do not blow up
    tx = (t[:, 0] / safe).clamp(-1.3 * tan_x, 1.3 * tan_x) * safe
    ty = (t[:, 1] / safe).clamp(-1.3 * tan_y, 1.3 * tan_y) * safe
    zeros = torch.zeros_like(safe)
    # d(u, v)/d(x, y, z) of u = cx + f x / d, v = cy - f y / d with d = -z
    jac = torch.stack([
        torch.stack([focal / safe, zeros, focal * tx / safe ** 2], dim=-1),
        torch.stack([zeros, -focal / safe, -focal * ty / safe ** 2], dim=-1),
    ], dim=-2)  # (N, 2, 3)
    m = jac @ rot
    cov2d = m @ covariances @ m.transpose(-1, -2)
    a = cov2d[:, 0, 0] + DILATION
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + DILATION
    det = a * c - b * b
    ok = (depth > near) & (det > 0)
    det_safe = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - det).clamp_min(0.01))
    radii = torch.ceil(3.0 * torch.sqrt(lam.detach())).long()
    u = 0.5 * width + focal * t[:, 0] / safe
    v = 0.5 * height - focal * t[:, 1] / safe
    means2d = torch.stack([u, v], dim=-1)
    ud, vd = u.detach(), v.detach()
    on_image = (ud + radii > 0) & (ud - radii < width) & (vd + radii > 0) & (vd - radii < height)
    radii = torch.where(ok & on_image, radii, torch.zeros_like(radii))
    return Projected(means2d, conics, depth, radii)


def _candidate_pairs(means2d: Tensor, radii: Tensor, half_x: Tensor, half_y: Tensor, width: int, height: int,
                     block: int) -> tuple[Tensor, Tensor, Tensor]:
    """(column, row, Gaussian index) of every pair where Gaussian n's α may reach 1/255: the pixels whose
    centres lie within (half_x[n], half_y[n]) of its mean, in the blocks its 3σ box touches (a pixel considers
    the Gaussians whose boxes touch its block). Ordered by Gaussian, then row, then column."""
    device = means2d.device
    u, v = means2d[:, 0], means2d[:, 1]

    def span(centre: Tensor, half: Tensor, size: int) -> tuple[Tensor, Tensor]:
        blocks = -(-size // block)
        first = torch.floor((centre - radii) / block).clamp(0, blocks - 1).long() * block  # blocks touched
        last = ((torch.ceil((centre + radii) / block).long() - 1).clamp(0, blocks - 1) + 1) * block - 1
        lo = torch.maximum(torch.ceil(centre - half - 0.5).long(), first).clamp_min(0)  # pixel centres within
        hi = torch.minimum(torch.floor(centre + half - 0.5).long(), last).clamp_max(size - 1)
        return lo, (hi - lo + 1).clamp_min(0)

    x0, nx = span(u, half_x, width)
    y0, ny = span(v, half_y, height)
    counts = nx * ny
    gauss = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    k = torch.arange(len(gauss), device=device) - (torch.cumsum(counts, 0) - counts)[gauss]
    nxg = nx[gauss]
    row = torch.div(k, nxg, rounding_mode="floor")
    return x0[gauss] + (k - row * nxg), y0[gauss] + row, gauss


def _alphas(col: Tensor, row: Tensor, gauss: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """α of each (pixel, Gaussian) pair, clamped at 0.99 and 0 below 1/255."""
    # index_select, not [gauss]: its backward sums the repeated rows in a fixed order (deterministic)
    m, con = means2d.index_select(0, gauss), conics.index_select(0, gauss)
    dx, dy = col.to(m.dtype) + 0.5 - m[:, 0], row.to(m.dtype) + 0.5 - m[:, 1]
    power = -0.5 * (con[:, 0] * dx * dx + con[:, 2] * dy * dy) - con[:, 1] * dx * dy
    alpha = (opacities.index_select(0, gauss) * torch.exp(power)).clamp(max=ALPHA_MAX)
    return torch.where(alpha >= ALPHA_MIN, alpha, torch.zeros_like(alpha))


def _segment_exclusive_log_transmittance(alpha: Tensor, first: Tensor) -> Tensor:
    """Σ_{j<i} log(1 - α_j) over the earlier pairs of the same pixel (pairs grouped by pixel, `first[i]` the
    index of its pixel's first pair), summed in float64 so that the running total over all pixels cancels
    exactly enough."""
    logs = torch.log1p(-alpha).double()
    inclusive = torch.cumsum(logs, 0)
    exclusive = inclusive - logs
    return exclusive - exclusive.index_select(0, first)


def rasterize(projected: Projected, opacities: Tensor, features: Tensor, width: int, height: int,
              block: int = 16) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of one view's projected Gaussians: (N,) opacities and (N, C)
    features (colours, depth, ...) -> ((H, W, C) Σ w_i f_i, (H, W) accumulated opacity 1 - T_final). The
    background is the caller's: C + (1 - opacity) · background.

    Only the (pixel, Gaussian) pairs that contribute are evaluated with gradients: pixels inside the bounding
    box of the Gaussian's α = 1/255 ellipse in blocks its 3σ box touches, with α ≥ 1/255, before their
    pixel's transmittance falls below 1e-4. Every other pair adds α = 0 and no gradient in the dense formula,
    so leaving it out changes nothing."""
    visible = projected.radii > 0
    order = torch.argsort(projected.depths.detach().masked_fill(~visible, float("inf")))
    order = order[: int(visible.sum())]
    means2d, conics = projected.means2d[order], projected.conics[order]
    opac, feats = opacities[order], features[order]
    with torch.no_grad():
        m2, con, op = means2d.detach(), conics.detach(), opac.detach()
        # α ≥ 1/255 needs dᵀ Σ'⁻¹ d ≤ k² = 2 ln(255 o): inside that ellipse's bounding box, whose half-widths
        # are k √Σ'_xx and k √Σ'_yy (Σ' from its inverse, the conic), widened by a hundredth of a pixel
        k = torch.sqrt(2.0 * torch.log((op * 255.0).clamp_min(1.0)))
        det = (con[:, 0] * con[:, 2] - con[:, 1] ** 2).clamp_min(1e-30)
        half_x = k * torch.sqrt(con[:, 2] / det) + 0.01
        half_y = k * torch.sqrt(con[:, 0] / det) + 0.01
        col, row, gauss = _candidate_pairs(m2, projected.radii[order].to(m2.dtype), half_x, half_y, width, height,
                                           block)
        alpha = _alphas(col, row, gauss, m2, con, op)
        hit = alpha > 0
        pixel, gauss, alpha = (row * width + col)[hit], gauss[hit], alpha[hit]
        by_pixel = torch.argsort(pixel, stable=True)  # per pixel, front to back (the Gaussians are in depth order)
        pixel, gauss, alpha = pixel[by_pixel], gauss[by_pixel], alpha[by_pixel]
        first = _first_of_segment(pixel)
        # the transmittance after each pair; a pixel stops before the pair that takes it below 1e-4
        after = torch.exp(_segment_exclusive_log_transmittance(alpha, first) + torch.log1p(-alpha).double())
        live = after >= T_MIN
        pixel, gauss = pixel[live], gauss[live]
        first = _first_of_segment(pixel)
    alpha = _alphas(pixel % width, torch.div(pixel, width, rounding_mode="floor"), gauss, means2d, conics, opac)
    trans = torch.exp(_segment_exclusive_log_transmittance(alpha, first)).to(alpha.dtype)
    weights = alpha * trans
    out = features.new_zeros(height * width, features.shape[-1]).index_add(
        0, pixel, weights[:, None] * feats.index_select(0, gauss))
    acc = features.new_zeros(height * width).index_add(0, pixel, weights)
    return out.reshape(height, width, -1), acc.reshape(height, width)


def _first_of_segment(keys: Tensor) -> Tensor:
    """For sorted `keys`, the index of the first element equal to each."""
    index = torch.arange(len(keys), device=keys.device)
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    return torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values


@dataclass
class SplatOutput:
    """A batch of views: (B, H, W, 3) colour composited over the background, (B, H, W, 1) opacity, (B, H, W, 1)
    expected depth (camera distance along -z, 0 where empty), and per view the pixel means ((N, 2) each, their
    gradients kept after backward: densification reads them; gsplat's backend gives one (B, N, 2) tensor) and
    radii ((B, N))."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    means2d: list[Tensor] | Tensor
    radii: Tensor


def focal_length(fovy: float | Tensor, height: int) -> float | Tensor:
    """The square pixels' focal length (pixels) of a vertical field of view `fovy` (radians; a tensor: per view)."""
    return 0.5 * height / (torch.tan(0.5 * fovy) if isinstance(fovy, Tensor) else math.tan(0.5 * fovy))


def render(means: Tensor, scales: Tensor, quaternions: Tensor, opacities: Tensor, colors: Tensor, c2w: Tensor,
           fovy: Tensor, width: int, height: int, background: Tensor, near: float = 0.01, block: int = 16
           ) -> SplatOutput:
    """Render (N, ...) Gaussians from each of B cameras (`c2w` (B, 4, 4), `fovy` (B,) radians) over
    `background` (B, H, W, 3); `colors` (N, 3), or (B, N, 3) for colours that depend on the view."""
    cov = covariance_3d(scales, quaternions)
    rgbs, alphas, depths, means2d, radii = [], [], [], [], []
    for i in range(c2w.shape[0]):
        w2c = torch.linalg.inv(c2w[i].to(means.dtype))
        proj = project(means, cov, w2c, focal_length(float(fovy[i]), height), width, height, near)
        if proj.means2d.requires_grad:
            proj.means2d.retain_grad()
        feats = torch.cat([colors if colors.dim() == 2 else colors[i], proj.depths[:, None]], dim=-1)
        image, alpha = rasterize(proj, opacities, feats, width, height, block)
        rgbs.append(image[..., :3] + (1.0 - alpha[..., None]) * background[i])
        depths.append(image[..., 3:])
        alphas.append(alpha[..., None])
        means2d.append(proj.means2d)
        radii.append(proj.radii)
    return SplatOutput(torch.stack(rgbs), torch.stack(alphas), torch.stack(depths), means2d, torch.stack(radii))
