"""The NeRF field on empty batches: a chunk of rays that meets no occupied space evaluates it on zero
points, forward, backward and for normals."""

import pytest
import torch

from threed.config import FieldConfig
from threed.fields.nerf import NeRFField


@pytest.mark.parametrize("normals", ["finite_difference", "analytic"])
def test_zero_points(normals):
    torch.manual_seed(0)
    cfg = FieldConfig(backend="torch", n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32,
                      hidden_dim=16, normals=normals)
    field = NeRFField(cfg, 1.0).train()
    x = torch.zeros(0, 3)
    sigma, albedo = field(x)
    assert sigma.shape == (0,) and albedo.shape == (0, 3)
    assert field.density(x).shape == (0,) and field.albedo(x).shape == (0, 3)
    n = field.normal(x)
    assert n.shape == (0, 3)
    (sigma.sum() + albedo.sum() + n.sum()).backward()
    for p in field.parameters():
        assert p.grad is None or p.grad.abs().sum().item() == 0.0
