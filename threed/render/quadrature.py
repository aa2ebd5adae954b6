"""Volume-rendering quadrature and compositing: plain tensors in, plain tensors out, any device.

Both renderer backends (threed/render/volume.py) evaluate the same sums through these functions. For the
samples i of one ray, with density sigma_i over an interval of length delta_i = t_end_i - t_start_i:

    alpha_i = 1 - exp(-sigma_i delta_i)                  opacity of the interval
    T_i     = prod_{j<i} (1 - alpha_j + 1e-10)           transmittance: light reaching sample i
    w_i     = T_i alpha_i                                compositing weight, sum_i w_i <= 1
    out     = sum_i w_i v_i                              accumulated value (colour, depth, 1 for opacity)

(the 1e-10 keeps every factor of the product positive, so its backward never divides by zero).

Samples come in one of two layouts, as in nerfacc:
- batched: tensors of shape (n_rays, n_samples), every ray with the same number of samples (the PyTorch
  renderer's stratified samples); `ray_indices` is None;
- packed: flat tensors (n,), samples grouped by ray in marching order, `ray_indices` (n,) naming each
  sample's ray and `n_rays` the number of rays (nerfacc's occupancy-grid sampler).

Every function accepts zero samples and zero rays: a ray without samples has weight sum 0 and accumulates
zeros, so a chunk of rays that sees only empty space renders as background.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-10


def alphas_from_densities(sigmas: Tensor, deltas: Tensor) -> Tensor:
    """alpha_i = 1 - exp(-sigma_i delta_i); `deltas` broadcasts against `sigmas` (e.g. (n_rays, 1))."""
    return 1.0 - torch.exp(-sigmas * deltas)


def _exclusive_cumprod(factors: Tensor) -> Tensor:
    """prod_{j<i} factors_j along the last axis (1 for the first sample)."""
    ones = torch.ones(*factors.shape[:-1], 1, device=factors.device, dtype=factors.dtype)
    return torch.cumprod(torch.cat([ones, factors], -1), -1)[..., :-1]


def packed_positions(ray_indices: Tensor, n_rays: int) -> tuple[Tensor, int]:
    """Each packed sample's position along its ray (0, 1, ...) and the largest sample count of any ray.

    Requires the samples of a ray to be contiguous and in marching order (what nerfacc's sampler returns).
    Reading the largest count is one device-to-host copy.
    """
    n = ray_indices.shape[0]
    counts = torch.bincount(ray_indices, minlength=n_rays) if n else ray_indices.new_zeros(n_rays)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(n, device=ray_indices.device) - starts[ray_indices]
    return positions, int(counts.max()) if n else 0


def transmittance_from_alphas(alphas: Tensor, ray_indices: Tensor | None = None, n_rays: int | None = None,
                              positions: tuple[Tensor, int] | None = None) -> Tensor:
    """T_i = prod_{j<i} (1 - alpha_j + 1e-10) along each ray, in the layout of `alphas`.

    Packed samples are laid out as a (n_rays, largest count) array padded with alpha = 0 (a factor of 1),
    so both layouts run the same product. `positions` (from `packed_positions`) may be passed to reuse it.
    """
    if ray_indices is None:
        return _exclusive_cumprod(1.0 - alphas + EPS)
    assert n_rays is not None, "packed samples need n_rays"
    pos, width = positions if positions is not None else packed_positions(ray_indices, n_rays)
    padded = alphas.new_ones(n_rays, width).index_put((ray_indices, pos), 1.0 - alphas + EPS)
    return _exclusive_cumprod(padded)[ray_indices, pos]


def weights_from_densities(sigmas: Tensor, deltas: Tensor, ray_indices: Tensor | None = None,
                           n_rays: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Compositing weights w_i = T_i alpha_i, with the transmittances T_i and opacities alpha_i."""
    alphas = alphas_from_densities(sigmas, deltas)
    trans = transmittance_from_alphas(alphas, ray_indices, n_rays)
    return alphas * trans, trans, alphas


def accumulate_along_rays(weights: Tensor, values: Tensor | None = None, ray_indices: Tensor | None = None,
                          n_rays: int | None = None) -> Tensor:
    """sum_i w_i v_i per ray -> (n_rays, C); with `values` None, sum_i w_i (the opacity) -> (n_rays, 1).

    Batched: weights (n_rays, S), values (n_rays, S, C). Packed: weights (n,), values (n, C).
    """
    if ray_indices is None:
        if values is None:
            return weights.sum(-1, keepdim=True)
        return (weights[..., None] * values).sum(-2)
    assert n_rays is not None, "packed samples need n_rays"
    src = weights[:, None] if values is None else weights[:, None] * values
    out = torch.zeros(n_rays, src.shape[-1], device=weights.device, dtype=src.dtype)
    return out.index_add(0, ray_indices, src)
