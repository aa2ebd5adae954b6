"""Stand-ins for the renderer's tests: a smooth analytic field, and a pure-PyTorch ray marcher with the
interface of nerfacc's OccGridEstimator.sampling, so the renderer's packed-sample path runs on a CPU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianBlob(nn.Module):
    """sigma(x) = peak * exp(-|x|^2 / (2 std^2)), albedo sigmoid(3x), normals x / |x|: smooth, so two quadratures
    with the same step agree closely; negligible density at the cube's faces (1e-5 at |x| = 1)."""

    def __init__(self, peak: float = 20.0, std: float = 0.2):
        super().__init__()
        self.peak, self.std = peak, std

    def density(self, x: Tensor) -> Tensor:
        return self.peak * torch.exp(-x.square().sum(-1) / (2 * self.std**2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.density(x), torch.sigmoid(3.0 * x)

    def normal(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class MarchingSampler:
    """Packed intervals of length `render_step_size` from t_min, the last clipped at t_max (as nerfacc marches
    an all-occupied grid without early stopping); `empty=True` returns no samples at all."""

    def __init__(self, empty: bool = False):
        self.empty = empty

    def sampling(self, rays_o: Tensor, rays_d: Tensor, sigma_fn, t_min: Tensor, t_max: Tensor,
                 render_step_size: float, **_) -> tuple[Tensor, Tensor, Tensor]:
        counts = torch.ceil((t_max - t_min) / render_step_size).long().clamp_min(0)
        if self.empty:
            counts = torch.zeros_like(counts)
        ray = torch.repeat_interleave(torch.arange(len(rays_o), device=rays_o.device), counts)
        first = torch.cumsum(counts, 0) - counts
        i = torch.arange(len(ray), device=rays_o.device) - first[ray]
        t_starts = t_min[ray] + i * render_step_size
        return ray, t_starts, torch.minimum(t_starts + render_step_size, t_max[ray])
