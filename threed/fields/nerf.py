"""The optimised 3D field: density and albedo from a hash-grid encoding and a small MLP.

field.heads chooses the MLP: shared, one MLP with four outputs (threed's first design), or separate,
threestudio's implicit-volume (threestudio/models/geometry/implicit_volume.py): a density MLP with one output
and an albedo ("feature") MLP with three on the same hash-grid features, their linear layers bias-free as its
VanillaMLP's. With separate heads a density query (normals by finite differences, marching cubes, the
occupancy grid) runs the density MLP only. The heads are PyTorch layers on every hash-grid backend, as
threestudio's VanillaMLP is on its tiny-cuda-nn grid.

With field.progressive_levels the finer levels' features are masked to zero until their step (threestudio's
ProgressiveBandHashGrid, for smooth normals early on): `set_step` sets the mask from the training step.

Density gets a "blob" bias at the origin (Magic3D: scale * (1 - |x| / std), positive inside radius std and
negative outside) so the first renders show an object-sized shape for the guidance to carve, instead of empty
space with no gradient, while the space around it starts clear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from threed.config import FieldConfig
from threed.fields.hashgrid_backend import make_hashgrid


class _TruncExp(Function):
    """exp(x) whose gradient is clamped at x = 15: stable for densities that start large."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


def field_mlp(cfg: FieldConfig, in_dim: int, out_dim: int, device: torch.device | str | None,
              bias: bool = True) -> nn.Sequential:
    """The small MLP on a hash grid's features: cfg.n_hidden_layers ReLU layers of cfg.hidden_dim."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(cfg.n_hidden_layers):
        layers += [nn.Linear(width, cfg.hidden_dim, bias=bias), nn.ReLU(inplace=True)]
        width = cfg.hidden_dim
    layers.append(nn.Linear(width, out_dim, bias=bias))
    return nn.Sequential(*layers).to(device)


class SeparateHeads(nn.Module):
    """threestudio's two MLPs on one feature vector: `density` (1 output) and `feature` (3: albedo), each
    field_mlp-shaped and bias-free. Called on features it returns the shared MLP's layout, (N, 4)."""

    def __init__(self, cfg: FieldConfig, in_dim: int, device: torch.device | str | None):
        super().__init__()
        self.density = field_mlp(cfg, in_dim, 1, device, bias=False)
        self.feature = field_mlp(cfg, in_dim, 3, device, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        return torch.cat([self.density(features), self.feature(features)], dim=-1)


class NeRFField(nn.Module):
    """Points in the cube [-bound, bound]^3 -> (density >= 0, albedo in [0, 1]^3)."""

    def __init__(self, cfg: FieldConfig, bound: float, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.bound = bound
        self.encoding, self.backend = make_hashgrid(cfg, device)
        # `mlp` holds the heads either way, so optimiser groups (optim.lr_mlp) find them under one name
        self.separate = cfg.heads == "separate"
        self.mlp: nn.Module = (SeparateHeads(cfg, self.encoding.output_dim, device) if self.separate
                               else field_mlp(cfg, self.encoding.output_dim, 4, device))
        # 1 for the levels in use, 0 for the rest (progressive_levels); not saved: `set_step` derives it
        self.register_buffer("level_mask", torch.ones(self.encoding.output_dim, device=device), persistent=False)

    def active_levels(self, step: int) -> int:
        """How many levels reach the MLP at `step` (all without field.progressive_levels)."""
        if not self.cfg.progressive_levels:
            return self.cfg.n_levels
        start_level, start_step, update_steps = self.cfg.progressive_levels
        return min(start_level + max(step - start_step, 0) // update_steps, self.cfg.n_levels)

    def set_step(self, step: int) -> None:
        """The level mask for training step `step`."""
        if self.cfg.progressive_levels:
            self.level_mask.zero_()[: self.active_levels(step) * self.cfg.n_features_per_level] = 1.0

    def density_bias(self, x: Tensor) -> Tensor:
        r = x.norm(dim=-1)
        return self.cfg.density_blob_scale * (1.0 - r / self.cfg.density_blob_std)

    def _activate(self, raw: Tensor, x: Tensor) -> Tensor:
        raw = raw + self.density_bias(x)
        if self.cfg.density_activation == "softplus":
            return nn.functional.softplus(raw)
        return trunc_exp(raw)

    def _features(self, x: Tensor) -> Tensor:
        unit = ((x / self.bound) + 1.0) * 0.5
        features = self.encoding(unit.clamp(0.0, 1.0))
        return features * self.level_mask if self.cfg.progressive_levels else features

    def _raw(self, x: Tensor) -> Tensor:
        return self.mlp(self._features(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3) -> density (N,), albedo (N, 3). N may be 0 (a chunk of rays that met no occupied space)."""
        raw = self._raw(x)
        return self._activate(raw[:, 0], x), torch.sigmoid(raw[:, 1:])

    def density(self, x: Tensor) -> Tensor:
        if self.separate:
            return self._activate(self.mlp.density(self._features(x))[:, 0], x)
        return self._activate(self._raw(x)[:, 0], x)

    def albedo(self, x: Tensor) -> Tensor:
        if self.separate:
            return torch.sigmoid(self.mlp.feature(self._features(x)))
        return torch.sigmoid(self._raw(x)[:, 1:])

    def normal(self, x: Tensor) -> Tensor:
        """Unit outward normals -grad(density)/|grad(density)|, by central differences or autograd."""
        if self.cfg.normals == "analytic":
            with torch.enable_grad():
                xg = x if x.requires_grad else x.detach().requires_grad_(True)
                sigma = self.density(xg)
                grad = torch.autograd.grad(sigma.sum(), xg, create_graph=self.training)[0]
        else:
            eps = self.cfg.finite_difference_eps * self.bound
            offsets = torch.eye(3, device=x.device) * eps
            pts = torch.cat([x[:, None] + offsets, x[:, None] - offsets], dim=1)  # (N, 6, 3)
            sigma = self.density(pts.reshape(-1, 3)).view(-1, 6)
            grad = (sigma[:, :3] - sigma[:, 3:]) / (2 * eps)
        return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-8)
