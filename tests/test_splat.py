"""The PyTorch Gaussian rasterizer (threed/render/splat.py) against closed forms.

- One isotropic Gaussian: its image is o · exp(-½ rᵀ Σ'⁻¹ r) around the pixel its mean projects to, with
  Σ' = σ² J Jᵀ + 0.3 I (J the perspective map's Jacobian at the mean), peak o and, on the axis, width
  √((f σ / d)² + 0.3) pixels; the projected pixel is the one the camera's clip matrix (the mesh rasterizer's)
  puts the mean at.
- Two Gaussians on one line of sight composite front to back by depth, whatever their order in the arrays.
- The clamp at α = 0.99 and the 1/255 cut-off.
- Gradients of every input against finite differences (torch.autograd.gradcheck, float64).
- The sparse evaluation (only the pairs that contribute) against the dense one (every pixel of a block
  against every Gaussian whose box touches it), images and gradients, on a random scene.
"""

from __future__ import annotations

import math

import pytest
import torch

from threed.cameras import make_cameras
from threed.render import splat


def _camera(width: int, height: int, elevation: float = 0.0, azimuth: float = 0.0, distance: float = 2.0,
            fovy: float = 50.0, dtype: torch.dtype = torch.float32):
    cams = make_cameras(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([distance]),
                        torch.tensor([fovy]), width, height)
    return cams, cams.c2w.to(dtype), cams.fovy.to(dtype)


def _render(means, scales, opacities, colors, c2w, fovy, width, height, bg=0.0, quats=None):
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=means.dtype).repeat(len(means), 1) if quats is None else quats
    background = torch.full((1, height, width, 3), bg, dtype=means.dtype)
    return splat.render(means, scales, quats, opacities, colors, c2w, fovy, width, height, background)


def _pixel_grid(width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    return xs, ys


@pytest.mark.parametrize("position", [(0.0, 0.0, 0.0), (0.12, -0.07, 0.1)])
def test_one_isotropic_gaussian_is_the_analytic_2d_gaussian(position) -> None:
    w, h, sigma, opacity = 65, 57, 0.04, 0.7
    cams, c2w, fovy = _camera(w, h, elevation=20.0, azimuth=35.0, dtype=torch.float64)
    mean = torch.tensor([position], dtype=torch.float64)
    colour = torch.tensor([[0.9, 0.4, 0.1]], dtype=torch.float64)
    out = _render(mean, torch.full((1, 3), sigma, dtype=torch.float64), torch.tensor([opacity], dtype=torch.float64),
                  colour, c2w, fovy, w, h, bg=0.25)
    # where the mesh rasterizer's clip matrix puts the mean: NDC -> pixels (row 0 at the top)
    clip = cams.clip_matrices().double()[0] @ torch.cat([mean[0], torch.ones(1, dtype=torch.float64)])
    u, v = (clip[0] / clip[3] + 1) * w / 2, (1 - clip[1] / clip[3]) * h / 2
    assert torch.allclose(out.means2d[0][0], torch.stack([u, v]), atol=1e-9)
    # Σ' = σ² J Jᵀ + 0.3 I in camera coordinates
    t = torch.linalg.inv(c2w[0]) @ torch.cat([mean[0], torch.ones(1, dtype=torch.float64)])
    x, y, z = t[:3]
    d = -z
    f = 0.5 * h / math.tan(0.5 * float(fovy[0]))
    jac = torch.tensor([[f / d, 0.0, f * x / d ** 2], [0.0, -f / d, -f * y / d ** 2]], dtype=torch.float64)
    cov = sigma ** 2 * jac @ jac.T + 0.3 * torch.eye(2, dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    xs, ys = _pixel_grid(w, h)
    rx, ry = xs - u, ys - v
    expected = opacity * torch.exp(-0.5 * (inv[0, 0] * rx ** 2 + 2 * inv[0, 1] * rx * ry + inv[1, 1] * ry ** 2))
    inside = expected >= 1.0 / 255.0  # outside, the 1/255 cut-off and the 3σ box decide
    alpha = out.opacity[0, ..., 0]
    assert inside.sum() > 20
    assert torch.allclose(alpha[inside], expected[inside], atol=1e-12)
    assert alpha[~inside].max() <= 1.0 / 255.0
    assert torch.allclose(out.rgb[0][inside], (colour[0] * expected[inside][:, None]
                                               + 0.25 * (1 - expected[inside][:, None])), atol=1e-12)
    if position == (0.0, 0.0, 0.0):  # on the axis: peak o at the centre pixel, width √((fσ/d)² + 0.3) pixels
        width_px = math.sqrt((f * sigma / float(d)) ** 2 + 0.3)
        assert torch.allclose(cov, torch.eye(2, dtype=torch.float64) * width_px ** 2, atol=1e-9)
        # (to float32 camera precision: the pose is built in float32, so the mean sits ~1e-7 px off the centre)
        assert float(alpha[h // 2, w // 2]) == pytest.approx(opacity, rel=1e-6)
        assert float(alpha[h // 2, w // 2 + 2]) == pytest.approx(opacity * math.exp(-2.0 / width_px ** 2), rel=1e-5)


@pytest.mark.parametrize("swap", [False, True])
def test_two_gaussians_composite_front_to_back_by_depth(swap: bool) -> None:
    w = h = 33
    _, c2w, fovy = _camera(w, h)  # looks from +z at the origin: larger z is nearer
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    means = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.0, -0.3]])  # red in front
    colours, opacities = torch.stack([red, blue]), torch.tensor([0.6, 0.8])
    if swap:  # the same scene, listed back to front: the order in the arrays must not matter
        means, colours, opacities = means.flip(0), colours.flip(0), opacities.flip(0)
    out = _render(means, torch.full((2, 3), 0.1), opacities, colours, c2w, fovy, w, h, bg=1.0)
    centre = out.rgb[0, h // 2, w // 2]
    a1, a2 = 0.6, 0.8  # both peak at the centre pixel
    expected = a1 * red + (1 - a1) * a2 * blue + (1 - a1) * (1 - a2) * torch.ones(3)
    assert torch.allclose(centre, expected, atol=1e-6)
    assert float(out.opacity[0, h // 2, w // 2, 0]) == pytest.approx(1 - (1 - a1) * (1 - a2), abs=1e-6)
    depth = (a1 * 1.7 + (1 - a1) * a2 * 2.3)  # expected camera depth, weighted like the colour
    assert float(out.depth[0, h // 2, w // 2, 0]) == pytest.approx(depth, abs=1e-5)


def test_alpha_is_clamped_at_0_99_and_cut_below_1_over_255() -> None:
    w = h = 17
    _, c2w, fovy = _camera(w, h)
    out = _render(torch.zeros(1, 3), torch.full((1, 3), 0.05), torch.tensor([1.0]), torch.ones(1, 3), c2w, fovy, w, h)
    assert float(out.opacity[0, h // 2, w // 2, 0]) == pytest.approx(0.99, abs=1e-7)
    faint = _render(torch.zeros(1, 3), torch.full((1, 3), 0.05), torch.tensor([0.0035]), torch.ones(1, 3), c2w, fovy,
                    w, h)
    assert float(faint.opacity.max()) == 0.0


def test_gradients_match_finite_differences() -> None:
    """gradcheck in float64 on three overlapping Gaussians (anisotropic, rotated) in a 12x10 image."""
    w, h = 12, 10
    _, c2w, fovy = _camera(w, h, elevation=15.0, azimuth=20.0, dtype=torch.float64)
    torch.manual_seed(0)
    means = (torch.randn(3, 3, dtype=torch.float64) * 0.08).requires_grad_()
    log_scales = torch.log(torch.tensor([[0.10, 0.06, 0.08], [0.07, 0.12, 0.05], [0.09, 0.09, 0.11]],
                                        dtype=torch.float64)).requires_grad_()
    quats = torch.randn(3, 4, dtype=torch.float64).requires_grad_()
    opacities = torch.tensor([0.5, 0.7, 0.4], dtype=torch.float64).requires_grad_()
    colours = torch.rand(3, 3, dtype=torch.float64).requires_grad_()
    background = torch.full((1, h, w, 3), 0.3, dtype=torch.float64)

    def f(m, s, q, o, c):
        out = splat.render(m, torch.exp(s), q, o, c, c2w, fovy, w, h, background)
        return out.rgb, out.opacity, out.depth

    assert torch.autograd.gradcheck(f, (means, log_scales, quats, opacities, colours), eps=1e-6, atol=1e-5)


def test_pixel_means_keep_their_gradient_for_densification() -> None:
    w = h = 16
    _, c2w, fovy = _camera(w, h)
    means = torch.tensor([[0.05, 0.0, 0.0]], requires_grad=True)
    out = _render(means, torch.full((1, 3), 0.05), torch.tensor([0.8]), torch.ones(1, 3), c2w, fovy, w, h)
    out.rgb[..., : w // 2, :].sum().backward()  # the white in the left half grows as the splat moves left
    grad = out.means2d[0].grad
    assert grad is not None and grad.shape == (1, 2)
    assert float(grad[0, 0]) < 0 and abs(float(grad[0, 1])) < 1e-6 * abs(float(grad[0, 0]))


def _dense_rasterize(projected: splat.Projected, opacities, features, width: int, height: int, block: int):
    """The dense formula: every pixel of a block against every Gaussian whose 3σ box touches the block, sorted
    by depth, α clamped and cut, stopped before T < 1e-4 (the rasterizer's previous evaluation)."""
    visible = projected.radii > 0
    order = torch.argsort(projected.depths.detach().masked_fill(~visible, float("inf")))[: int(visible.sum())]
    means2d, conics = projected.means2d[order], projected.conics[order]
    radii = projected.radii[order].to(means2d.dtype)
    opac, feats = opacities[order], features[order]
    lo, hi = means2d.detach() - radii[:, None], means2d.detach() + radii[:, None]
    out = features.new_zeros(height, width, features.shape[-1])
    acc = features.new_zeros(height, width)
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            y1, x1 = min(y0 + block, height), min(x0 + block, width)
            idx = ((hi[:, 1] > y0) & (lo[:, 1] < y1) & (hi[:, 0] > x0) & (lo[:, 0] < x1)).nonzero().squeeze(1)
            gy, gx = torch.meshgrid(torch.arange(y0, y1, dtype=means2d.dtype) + 0.5,
                                    torch.arange(x0, x1, dtype=means2d.dtype) + 0.5, indexing="ij")
            d = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)[:, None, :] - means2d[idx][None]
            c = conics[idx]
            power = -0.5 * (c[:, 0] * d[..., 0] ** 2 + c[:, 2] * d[..., 1] ** 2) - c[:, 1] * d[..., 0] * d[..., 1]
            alpha = (opac[idx] * torch.exp(power)).clamp(max=splat.ALPHA_MAX)
            alpha = torch.where(alpha >= splat.ALPHA_MIN, alpha, torch.zeros_like(alpha))
            keep = torch.cumprod(1.0 - alpha, dim=1)
            alpha = torch.where(keep.detach() >= splat.T_MIN, alpha, torch.zeros_like(alpha))
            trans = torch.cumprod(1.0 - alpha, dim=1)
            weights = alpha * torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], dim=1)
            out = out.index_put((torch.arange(y0, y1)[:, None], torch.arange(x0, x1)[None]),
                                (weights @ feats[idx]).reshape(y1 - y0, x1 - x0, -1))
            acc = acc.index_put((torch.arange(y0, y1)[:, None], torch.arange(x0, x1)[None]),
                                weights.sum(1).reshape(y1 - y0, x1 - x0))
    return out, acc


@pytest.mark.parametrize("block", [16, 7])
def test_sparse_pairs_equal_the_dense_evaluation(block: int) -> None:
    """400 random Gaussians (opaque and faint, large and small, some off the image) in a 50x37 image: colour,
    opacity and the gradients of every input agree with the dense evaluation to float64 rounding; enough
    pixels stop (T < 1e-4) and enough pairs fall below 1/255 inside their blocks for both rules to matter."""
    w, h = 50, 37
    _, c2w, fovy = _camera(w, h, elevation=10.0, azimuth=30.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    n = 400
    means = (torch.randn(n, 3, generator=gen, dtype=torch.float64) * 0.35).requires_grad_()
    log_scales = torch.log(torch.rand(n, 3, generator=gen, dtype=torch.float64) * 0.1 + 0.005).requires_grad_()
    quats = torch.randn(n, 4, generator=gen, dtype=torch.float64).requires_grad_()
    opac = torch.rand(n, generator=gen, dtype=torch.float64).requires_grad_()
    feats = torch.rand(n, 4, generator=gen, dtype=torch.float64).requires_grad_()
    inputs = (means, log_scales, quats, opac, feats)
    w2c = torch.linalg.inv(c2w[0])
    focal = splat.focal_length(float(fovy[0]), h)
    weights = torch.rand(h, w, 5, generator=gen, dtype=torch.float64)
    results = []
    for fn in (splat.rasterize, _dense_rasterize):
        proj = splat.project(means, splat.covariance_3d(torch.exp(log_scales), quats), w2c, focal, w, h)
        image, alpha = fn(proj, opac, feats, w, h, block)
        loss = (torch.cat([image, alpha[..., None]], -1) * weights).sum()
        results.append((image, alpha, torch.autograd.grad(loss, inputs)))
    (image, alpha, grads), (image_ref, alpha_ref, grads_ref) = results
    assert torch.allclose(image, image_ref, atol=1e-10) and torch.allclose(alpha, alpha_ref, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-8, rtol=1e-8)
    assert int((alpha_ref > 0.9995).sum()) > 20  # pixels where the stop at T < 1e-4 decides
    assert float(alpha_ref.detach().min()) < 0.5 and float(grads_ref[0].abs().max()) > 0
