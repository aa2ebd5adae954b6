"""A binary occupancy grid for skipping empty space in the PyTorch renderer (Instant-NGP style).

Every few steps each cell's occupancy (density at a jittered point in it, times the marching step) is
blended into an exponential moving maximum; cells above a threshold, grown by one cell so surfaces can
expand, are occupied. Samples in unoccupied cells get zero density without evaluating the field.
This mirrors what nerfacc's OccGridEstimator does on CUDA, for any device.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from threed.render.rng import uniform


class OccupancyGrid(nn.Module):
    def __init__(self, bound: float, resolution: int, threshold: float, step_size: float, decay: float = 0.95):
        super().__init__()
        self.bound, self.resolution, self.threshold = bound, resolution, threshold
        self.step_size, self.decay = step_size, decay
        self.register_buffer("occs", torch.zeros(resolution, resolution, resolution))
        self.register_buffer("binary", torch.ones(resolution, resolution, resolution, dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], generator: torch.Generator | None = None,
               chunk: int = 65536) -> None:
        r = self.resolution
        device = self.occs.device
        idx = torch.stack(torch.meshgrid(*[torch.arange(r, device=device)] * 3, indexing="ij"), -1).view(-1, 3)
        jitter = uniform(tuple(idx.shape), generator, device)
        pts = ((idx + jitter) / r * 2.0 - 1.0) * self.bound
        occ = torch.cat([density_fn(pts[i:i + chunk]) for i in range(0, len(pts), chunk)]) * self.step_size
        self.occs.copy_(torch.maximum(self.occs * self.decay, occ.view(r, r, r)))
        # level = min(mean of the positive occupancies, threshold), computed on the device (no host sync)
        positive = self.occs > 0
        mean = (self.occs * positive).sum() / positive.sum().clamp_min(1)
        level = torch.where(positive.any(), mean.clamp(max=self.threshold), self.threshold)
        grown = nn.functional.max_pool3d((self.occs > level).float()[None, None], 3, stride=1, padding=1)[0, 0]
        self.binary.copy_(grown > 0)
        self.updates += 1

    def query(self, pts: Tensor) -> Tensor:
        """(N, 3) points -> (N,) bool: inside an occupied cell."""
        r = self.resolution
        cell = ((pts / self.bound + 1.0) * 0.5 * r).long().clamp_(0, r - 1)
        return self.binary[cell[:, 0], cell[:, 1], cell[:, 2]]
