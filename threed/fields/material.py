"""A physically based material as a field: points -> albedo, roughness, metallic (Fantasia3D's appearance).

A hash grid and a small MLP, as the NeRF's texture field (threed/fields/nerf.py), with five sigmoid outputs:
albedo (3), then roughness and metallic mapped linearly into their ranges ([0.08, 0.9] and [0, 0.9] in
Fantasia3D: never a perfect mirror, never a full metal, whose split-sum shading would be all reflection).
threestudio's pbr-material reads the same activations from its geometry's features, plus three for a
tangent-space bump map, which threed does not model (its meshes carry no tangents).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threed.config import FieldConfig
from threed.fields.hashgrid_backend import make_hashgrid
from threed.fields.nerf import field_mlp


class MaterialField(nn.Module):
    """Points in [-bound, bound]^3 -> (N, 5): albedo in [0, 1]^3, roughness and metallic in their ranges."""

    def __init__(self, cfg: FieldConfig, bound: float, roughness: tuple[float, float] = (0.08, 0.9),
                 metallic: tuple[float, float] = (0.0, 0.9), device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        self.bound = bound
        self.roughness_range = (float(roughness[0]), float(roughness[1]))
        self.metallic_range = (float(metallic[0]), float(metallic[1]))
        self.encoding, self.backend = make_hashgrid(cfg, device)
        self.mlp = field_mlp(cfg, self.encoding.output_dim, 5, device)

    def _raw(self, x: Tensor) -> Tensor:
        unit = ((x / self.bound) + 1.0) * 0.5
        return self.mlp(self.encoding(unit.clamp(0.0, 1.0)))

    def material(self, x: Tensor) -> Tensor:
        """(N, 3) points -> (N, 5): albedo, roughness, metallic (what a PBR export bakes)."""
        s = torch.sigmoid(self._raw(x))
        (r0, r1), (m0, m1) = self.roughness_range, self.metallic_range
        return torch.cat([s[:, :3], r0 + (r1 - r0) * s[:, 3:4], m0 + (m1 - m0) * s[:, 4:5]], dim=-1)

    def albedo(self, x: Tensor) -> Tensor:
        """(N, 3) points -> (N, 3) albedo, as a texture field gives it (previews, vertex colours)."""
        return torch.sigmoid(self._raw(x)[:, :3])
