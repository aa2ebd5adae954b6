"""The PyTorch hash grid computes tiny-cuda-nn's function: dense levels are trilinear lookups of a lattice,
hashed levels use the Instant-NGP hash, and the encoding is differentiable in the table and the input."""

import math

import pytest
import torch
import torch.nn.functional as F

from threed.config import FieldConfig
from threed.fields.hashgrid import PRIMES, TorchHashGrid, level_layout, per_level_scale, tcnn_available


def small_cfg(**kw) -> FieldConfig:
    base = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, max_resolution=32)
    base.update(kw)
    return FieldConfig(**base)


def test_layout_matches_the_formula():
    cfg = small_cfg()
    b = per_level_scale(cfg)
    assert math.isclose(cfg.base_resolution * b ** (cfg.n_levels - 1), cfg.max_resolution)
    for level, (scale, res, size) in enumerate(level_layout(cfg)):
        assert math.isclose(scale, cfg.base_resolution * b**level - 1)
        assert res == math.ceil(scale) + 1
        assert size == min(2**cfg.log2_hashmap_size, (res**3 + 7) // 8 * 8)


def test_dense_level_is_trilinear_interpolation_of_a_lattice():
    torch.manual_seed(0)
    cfg = small_cfg(n_levels=1, max_resolution=4, base_resolution=6)
    enc = TorchHashGrid(cfg)
    scale, res, size = enc.layout[0]
    assert res**3 <= size  # dense
    with torch.no_grad():
        enc.params.normal_()
    lattice = enc.params.view(-1, 2)[: res**3].view(res, res, res, 2)  # index x + y*res + z*res^2 -> [z, y, x]
    x = torch.rand(500, 3)
    pos = x * scale + 0.5
    keep = (pos <= res - 1).all(-1)
    x, pos = x[keep], pos[keep]
    grid = (2.0 * pos / (res - 1) - 1.0).view(1, -1, 1, 1, 3)
    expected = F.grid_sample(lattice.permute(3, 0, 1, 2)[None], grid, align_corners=True, mode="bilinear")
    expected = expected.view(2, -1).T
    assert torch.allclose(enc(x), expected, atol=1e-5)


def test_hashed_level_uses_the_instant_ngp_hash():
    cfg = small_cfg(n_levels=1, base_resolution=64, max_resolution=64, log2_hashmap_size=10)
    enc = TorchHashGrid(cfg)
    scale, res, size = enc.layout[0]
    assert res**3 > size  # hashed
    with torch.no_grad():
        enc.params.copy_(torch.arange(enc.params.numel(), dtype=torch.float32))
    # A point on a lattice vertex reads exactly that vertex's entry.
    i, j, k = 17, 3, 40
    x = torch.tensor([[(i - 0.5) / scale, (j - 0.5) / scale, (k - 0.5) / scale]], dtype=torch.float64).float()
    h = ((i * PRIMES[0]) ^ (j * PRIMES[1]) ^ (k * PRIMES[2])) & 0xFFFFFFFF
    index = h % size
    assert torch.allclose(enc(x)[0], torch.tensor([2.0 * index, 2.0 * index + 1]), atol=1e-2)


def test_gradients_reach_table_and_input():
    enc = TorchHashGrid(small_cfg())
    x = torch.rand(64, 3, requires_grad=True)
    enc(x).square().sum().backward()
    assert enc.params.grad is not None and enc.params.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not tcnn_available("cuda"), reason="tinycudann on CUDA is not available here")
def test_tcnn_and_torch_backends_agree():
    from threed.fields.hashgrid import TcnnHashGrid

    cfg = small_cfg(n_levels=8, log2_hashmap_size=14, base_resolution=16, max_resolution=512)
    fast = TcnnHashGrid(cfg).cuda()
    ref = TorchHashGrid(cfg).cuda()
    with torch.no_grad():
        ref.params.copy_(fast.params.float())
    x = torch.rand(4096, 3, device="cuda")
    assert torch.allclose(fast(x), ref(x), atol=1e-4)


def test_fused_gather_backward_matches_finite_differences():
    from threed.fields.hashgrid import _WeightedGather

    torch.manual_seed(0)
    table = torch.randn(10, 2, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 10, (6, 8))
    weight = torch.rand(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WeightedGather.apply, (table, index, weight))


def test_zero_points_forward_and_backward():
    enc = TorchHashGrid(small_cfg())
    x = torch.zeros(0, 3, requires_grad=True)
    out = enc(x)
    assert out.shape == (0, enc.output_dim)
    out.sum().backward()
    assert enc.params.grad is not None and enc.params.grad.abs().sum().item() == 0.0
    assert x.grad is not None and x.grad.shape == (0, 3)


def test_backend_choice_on_cpu(monkeypatch):
    from threed.errors import UserError
    from threed.fields.hashgrid_backend import make_hashgrid

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert make_hashgrid(small_cfg(backend="auto"), "cpu")[1] == "torch"
    with pytest.raises(UserError, match="field.backend=triton needs a CUDA device"):
        make_hashgrid(small_cfg(backend="triton"), "cpu")
    with pytest.raises(UserError, match="field.backend=tcnn needs CUDA"):
        make_hashgrid(small_cfg(backend="tcnn"), "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter does not make auto pick triton on a CPU
    assert make_hashgrid(small_cfg(backend="auto"), "cpu")[1] == "torch"
