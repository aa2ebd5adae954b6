"""The quadrature functions against a per-ray loop of the textbook formulas, in both sample layouts, and
with zero samples and zero rays."""

import math

import torch

from threed.render.quadrature import (accumulate_along_rays, packed_positions, transmittance_from_alphas,
                                      weights_from_densities)


def loop_reference(sigmas, deltas, values, counts):
    """w_i = exp(-sum_{j<i} sigma_j delta_j) (1 - exp(-sigma_i delta_i)) and sum_i w_i v_i, ray by ray, in float64."""
    out, weights, start = [], [], 0
    for c in counts:
        optical, acc = 0.0, torch.zeros(values.shape[-1], dtype=torch.float64)
        for i in range(start, start + c):
            w = math.exp(-optical) * (1.0 - math.exp(-float(sigmas[i]) * float(deltas[i])))
            optical += float(sigmas[i]) * float(deltas[i])
            weights.append(w)
            acc += w * values[i].double()
        out.append(acc)
        start += c
    return torch.tensor(weights, dtype=torch.float64), torch.stack(out) if out else torch.zeros(0, values.shape[-1])


def test_packed_samples_match_the_per_ray_formulas():
    torch.manual_seed(0)
    counts = [3, 0, 5, 1, 0, 7]  # rays without samples among them
    ray_indices = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = len(ray_indices)
    sigmas, deltas, values = torch.rand(n) * 20, torch.rand(n) * 0.1, torch.rand(n, 3)
    w, trans, alphas = weights_from_densities(sigmas, deltas, ray_indices, len(counts))
    ref_w, ref_rgb = loop_reference(sigmas, deltas, values, counts)
    # the 1e-10 in each transmittance factor shifts weights by at most ~7 * 1e-10: float32 rounding dominates
    assert torch.allclose(w.double(), ref_w, atol=1e-6)
    assert torch.allclose(w, alphas * trans)
    rgb = accumulate_along_rays(w, values, ray_indices, len(counts))
    assert torch.allclose(rgb.double(), ref_rgb, atol=1e-6)
    opacity = accumulate_along_rays(w, None, ray_indices, len(counts))
    assert opacity.shape == (len(counts), 1)
    assert opacity[1].item() == 0.0 and opacity[4].item() == 0.0 and (opacity <= 1.0 + 1e-6).all()
    positions, width = packed_positions(ray_indices, len(counts))
    assert width == 7 and positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6]


def test_batched_and_packed_layouts_agree():
    torch.manual_seed(1)
    n_rays, s = 5, 9
    sigmas, values = torch.rand(n_rays, s) * 10, torch.rand(n_rays, s, 3)
    deltas = torch.rand(n_rays, 1) * 0.2
    wb, tb, _ = weights_from_densities(sigmas, deltas)
    ray_indices = torch.arange(n_rays).repeat_interleave(s)
    wp, tp, _ = weights_from_densities(sigmas.reshape(-1), deltas.expand(n_rays, s).reshape(-1), ray_indices, n_rays)
    assert torch.equal(wb.reshape(-1), wp) and torch.equal(tb.reshape(-1), tp)
    assert torch.allclose(accumulate_along_rays(wb, values), accumulate_along_rays(wp, values.view(-1, 3), ray_indices,
                                                                                    n_rays), atol=1e-6)
    assert torch.allclose(accumulate_along_rays(wb), accumulate_along_rays(wp, None, ray_indices, n_rays), atol=1e-6)


def test_zero_samples_and_zero_rays():
    sigmas = torch.zeros(0, requires_grad=True)
    values = torch.zeros(0, 3, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    for n_rays in (4, 0):
        w, trans, alphas = weights_from_densities(sigmas, torch.zeros(0), empty, n_rays)
        assert w.shape == trans.shape == alphas.shape == (0,)
        rgb = accumulate_along_rays(w, values, empty, n_rays)
        opacity = accumulate_along_rays(w, None, empty, n_rays)
        assert rgb.shape == (n_rays, 3) and opacity.shape == (n_rays, 1)
        assert rgb.abs().sum().item() == 0.0 and opacity.abs().sum().item() == 0.0
        (rgb.sum() + opacity.sum()).backward()
        assert sigmas.grad is not None and sigmas.grad.shape == (0,)
    # batched: zero rays, or rays with zero samples each
    for shape in ((0, 8), (3, 0)):
        w, _, _ = weights_from_densities(torch.zeros(shape), torch.ones(shape[0], 1))
        assert accumulate_along_rays(w, torch.zeros(*shape, 3)).shape == (shape[0], 3)
        assert accumulate_along_rays(w).shape == (shape[0], 1)
    assert transmittance_from_alphas(torch.zeros(0), empty, 2).shape == (0,)


def test_gradients_through_packed_transmittance():
    torch.manual_seed(2)
    counts = torch.tensor([4, 2, 0, 3])
    ray_indices = torch.repeat_interleave(torch.arange(4), counts)
    sigmas = (torch.rand(len(ray_indices), dtype=torch.float64) * 5).requires_grad_()
    deltas = torch.rand(len(ray_indices), dtype=torch.float64) * 0.3
    values = torch.rand(len(ray_indices), 3, dtype=torch.float64)

    def f(s):
        w, _, _ = weights_from_densities(s, deltas, ray_indices, 4)
        return accumulate_along_rays(w, values, ray_indices, 4)

    assert torch.autograd.gradcheck(f, (sigmas,))
