"""Multiresolution hash encoding (Instant-NGP): a pure-PyTorch, a Triton (hashgrid_triton.py) and a
tiny-cuda-nn backend; hashgrid_backend.py picks one for a device.

The PyTorch backend follows tiny-cuda-nn's conventions so that both compute the same function from the
same parameters: level l has scale s_l = base * b^l - 1 and resolution ceil(s_l) + 1; a point x in
[0, 1]^3 maps to x * s_l + 0.5; a level whose grid fits in its table is indexed densely, otherwise by the
spatial hash (x * 1) ^ (y * 2654435761) ^ (z * 805459861); each level's table holds
min(resolution^3 rounded up to a multiple of 8, 2^log2_hashmap_size) entries; corners are blended
trilinearly; parameters start uniform in [-1e-4, 1e-4].
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from threed.accelerators import importable_for
from threed.config import FieldConfig

PRIMES = (1, 2654435761, 805459861)


class _WeightedGather(torch.autograd.Function):
    """out[n] = sum_k weight[n, k] * table[index[n, k]]: a fused gather-and-blend.

    Forward is `embedding_bag`; backward scatters with `index_add_`, which (unlike embedding_bag's own
    backward) needs no sort of the indices: twice as fast for hash-grid training on a CPU.
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(table, index, weight)
        return nn.functional.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        table, index, weight = ctx.saved_tensors
        grad_table = grad_weight = None
        if ctx.needs_input_grad[0]:
            contrib = (weight[..., None] * grad[:, None, :]).reshape(-1, table.shape[1])
            grad_table = torch.zeros_like(table).index_add_(0, index.reshape(-1), contrib.to(table.dtype))
        if ctx.needs_input_grad[2]:
            grad_weight = (table[index] * grad[:, None, :]).sum(-1)
        return grad_table, None, grad_weight


def per_level_scale(cfg: FieldConfig) -> float:
    if cfg.n_levels == 1:
        return 1.0
    return math.exp(math.log(cfg.max_resolution / cfg.base_resolution) / (cfg.n_levels - 1))


def level_layout(cfg: FieldConfig) -> list[tuple[float, int, int]]:
    """(scale, resolution, table size) for every level, as tiny-cuda-nn lays them out."""
    b = per_level_scale(cfg)
    cap = 2**cfg.log2_hashmap_size
    layout = []
    for level in range(cfg.n_levels):
        scale = cfg.base_resolution * b**level - 1.0
        resolution = int(math.ceil(scale)) + 1
        dense = resolution**3
        size = min(cap, (dense + 7) // 8 * 8)
        layout.append((scale, resolution, size))
    return layout


class TorchHashGrid(nn.Module):
    """Hash-grid encoding in plain PyTorch: runs on any device, differentiable in the table and in x."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.n_features = cfg.n_features_per_level
        self.layout = level_layout(cfg)
        sizes = [size for _, _, size in self.layout]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        self.offsets = offsets
        self.params = nn.Parameter(torch.empty(offsets[-1] * self.n_features).uniform_(-1e-4, 1e-4))
        self.output_dim = cfg.n_levels * self.n_features

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3) in [0, 1] -> (N, n_levels * n_features); N may be 0.

        The 8 corner indices and trilinear weights of every level feed one fused gather-and-blend,
        so the (N, levels, 8, features) corner features are never materialised.
        """
        n = x.shape[0]
        table = self.params.view(-1, self.n_features)
        indices, weights = [], []
        for level, (scale, resolution, size) in enumerate(self.layout):
            pos = x * scale + 0.5
            grid = torch.floor(pos)
            frac = pos - grid
            lo = grid.long()
            c = [torch.stack([lo[:, d], lo[:, d] + 1], dim=1) for d in range(3)]  # (N, 2) per axis
            if resolution**3 <= size:
                index = (c[0][:, None, None, :] + c[1][:, None, :, None] * resolution
                         + c[2][:, :, None, None] * (resolution * resolution))
            else:
                index = ((c[0] * PRIMES[0])[:, None, None, :] ^ (c[1] * PRIMES[1])[:, None, :, None]
                         ^ (c[2] * PRIMES[2])[:, :, None, None]) & 0xFFFFFFFF
            indices.append((index % size + self.offsets[level]).view(n, 8))
            w = [torch.stack([1.0 - frac[:, d], frac[:, d]], dim=1) for d in range(3)]
            weights.append((w[0][:, None, None, :] * w[1][:, None, :, None] * w[2][:, :, None, None]).view(n, 8))
        index = torch.stack(indices, dim=1).view(-1, 8)
        weight = torch.stack(weights, dim=1).view(-1, 8)
        return _WeightedGather.apply(table, index, weight).view(n, self.output_dim)


class TcnnHashGrid(nn.Module):
    """The same encoding through tiny-cuda-nn's fused CUDA kernels (CUDA only)."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        import tinycudann as tcnn  # accelerator: imported only when chosen

        encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": cfg.n_levels, "n_features_per_level": cfg.n_features_per_level,
            "log2_hashmap_size": cfg.log2_hashmap_size, "base_resolution": cfg.base_resolution,
            "per_level_scale": per_level_scale(cfg), "interpolation": "Linear",
        }, dtype=torch.float32)
        # Hold the kernel module outside the registered children and expose its table as `params`, so a
        # checkpoint has the same keys under both backends (train with tcnn, export on a CPU machine).
        object.__setattr__(self, "_encoding", encoding)
        self.params = encoding.params
        self.output_dim = cfg.n_levels * cfg.n_features_per_level

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:  # an empty batch never reaches the kernels; the output stays in the graph
            return self.params[:0].float().view(0, 1).expand(0, self.output_dim)
        return self._encoding(x).float()


def tcnn_available(device: torch.device | str) -> bool:
    return importable_for(device, "tinycudann")


def triton_available(device: torch.device | str) -> bool:
    """Triton kernels run on CUDA tensors; on CPU tensors only under its interpreter (TRITON_INTERPRET=1)."""
    return importable_for(device, "triton", cpu=os.environ.get("TRITON_INTERPRET") == "1")
