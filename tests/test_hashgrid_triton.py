"""The Triton hash grid computes TorchHashGrid's function and table gradient (threed/fields/hashgrid_triton.py).

With CUDA the compiled kernels run on the GPU; without, they run in Triton's interpreter on CPU tensors.
`triton.jit` reads TRITON_INTERPRET when it decorates a kernel (triton's own library included, at `import
triton`), so tests/conftest.py sets it before anything imports triton on machines without CUDA. The
interpreter is slow: the cases are small. Real sizes are in tests/test_cuda.py.

Tolerances (float32, unit roundoff u = 2^-24), both from the kernels being compiled without FMA
contraction so that positions and weights round exactly as in PyTorch (measured in the interpreter: values
differ by 1.2e-7 with table entries of size 1):
- values: each output is a sum of 8 weighted corners whose weights sum to 1; two summation orders differ by
  at most 2 * 7 * u * sum |w v| <= 8.4e-7 * max |table|: allowed 1e-6 * max |table|;
- table gradients: entry e sums k_e terms w g in different orders (atomics); the difference is at most
  2 * k_e * u * S_e with S_e = sum |w g| (the gradient for |g|); k_e <= 8 * points = 1856 here: allowed
  3e-4 * S_e.
"""

from __future__ import annotations

import os

import pytest
import torch

from threed.config import FieldConfig
from threed.fields.hashgrid import TorchHashGrid, level_layout


@pytest.fixture(scope="module")
def device() -> str:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless it was set otherwise)")
    from threed.fields import hashgrid_triton

    assert type(hashgrid_triton._hashgrid_fwd).__name__ == "InterpretedFunction", \
        "triton was imported before TRITON_INTERPRET=1 was set; run: TRITON_INTERPRET=1 pytest tests/test_hashgrid_triton.py"
    return "cpu"


def pair(cfg: FieldConfig, device: str, seed: int = 0):
    """A Triton and a PyTorch grid sharing one table with entries uniform in [-1, 1] (large enough that a wrong
    index or weight shows)."""
    from threed.fields.hashgrid_triton import TritonHashGrid

    torch.manual_seed(seed)
    fast, ref = TritonHashGrid(cfg).to(device), TorchHashGrid(cfg).to(device)
    with torch.no_grad():
        fast.params.uniform_(-1.0, 1.0)
        ref.params.copy_(fast.params)
    return fast, ref


def sample_points(n_random: int, device: str, seed: int = 0) -> torch.Tensor:
    """Random points plus the boundary: cube corners, points on the x = 0 / x = 1 faces of each axis."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[i, j, k] for i in (0.0, 1.0) for j in (0.0, 1.0) for k in (0.0, 1.0)])
    faces = torch.rand(12, 3, generator=g)
    for axis in range(3):
        faces[4 * axis:4 * axis + 2, axis] = 0.0
        faces[4 * axis + 2:4 * axis + 4, axis] = 1.0
    return torch.cat([torch.rand(n_random, 3, generator=g), corners, faces]).to(device)


def check_agreement(fast, ref, x: torch.Tensor) -> None:
    """Values within 1e-6 * max |table|, table gradients within 3e-4 * S_e (module docstring)."""
    a, b = fast(x), ref(x)
    scale = ref.params.abs().max()
    assert (a - b).abs().max() <= 1e-6 * scale, f"max value difference {(a - b).abs().max().item():.3g}"
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    (a * g).sum().backward()
    (b * g).sum().backward()
    s = torch.autograd.grad((ref(x) * g.abs()).sum(), ref.params)[0]  # S_e = sum |w g| per entry
    diff = (fast.params.grad - ref.params.grad).abs()
    assert (diff <= 3e-4 * s + 1e-30).all(), f"max table-gradient difference {diff.max().item():.3g}"
    assert (ref.params.grad != 0).sum() > 0.5 * (s != 0).sum()  # the comparison is not of zeros


CONFIGS = {
    # level 0 dense (res 4: a point at x = 1 reaches corner index 4 = res, wrapped by "mod size"), 1-3 hashed
    "dense_and_hashed": FieldConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                                    max_resolution=64),
    # every level dense, 4 features per entry
    "dense_4_features": FieldConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=14, base_resolution=6,
                                    max_resolution=24),
    # every level hashed, 1 feature per entry
    "hashed_1_feature": FieldConfig(n_levels=2, n_features_per_level=1, log2_hashmap_size=8, base_resolution=16,
                                    max_resolution=40),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_values_and_table_gradients(device, name):
    cfg = CONFIGS[name]
    dense = [res**3 <= size for _, res, size in level_layout(cfg)]
    assert {"dense_and_hashed": dense[0] and not any(dense[1:]), "dense_4_features": all(dense),
            "hashed_1_feature": not any(dense)}[name]
    fast, ref = pair(cfg, device)
    check_agreement(fast, ref, sample_points(200, device))


def test_outside_the_cube_is_clamped(device):
    fast, ref = pair(CONFIGS["dense_and_hashed"], device)
    x = torch.tensor([[-0.2, 0.5, 1.3], [1.5, -1.0, 0.25]], device=device)
    assert torch.allclose(fast(x), ref(x.clamp(0.0, 1.0)), atol=1e-6)


def test_zero_points(device):
    fast, _ = pair(CONFIGS["dense_and_hashed"], device)
    out = fast(torch.zeros(0, 3, device=device))
    assert out.shape == (0, fast.output_dim)
    out.sum().backward()
    assert fast.params.grad is not None and fast.params.grad.abs().sum().item() == 0.0


def test_input_gradient_falls_back_to_pytorch(device):
    """Analytic normals need d/dx, which the kernels do not compute: the same function comes from PyTorch."""
    fast, ref = pair(CONFIGS["dense_and_hashed"], device)
    x = torch.rand(20, 3, device=device, requires_grad=True)
    out = fast(x)
    assert torch.equal(out, ref(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_checkpoint_keys_match_the_pytorch_grid(device):
    fast, ref = pair(CONFIGS["dense_and_hashed"], device)
    assert list(fast.state_dict()) == list(ref.state_dict()) == ["params"]
    TorchHashGrid(CONFIGS["dense_and_hashed"]).load_state_dict(fast.state_dict())


def test_field_with_triton_backend(device):
    """The field on the Triton grid: densities and finite-difference normals as on the PyTorch grid, and
    zero points."""
    from threed.fields.nerf import NeRFField

    base = dict(n_levels=3, log2_hashmap_size=10, base_resolution=4, max_resolution=32, hidden_dim=16)
    torch.manual_seed(0)
    fast = NeRFField(FieldConfig(backend="triton", **base), 1.0, device)
    ref = NeRFField(FieldConfig(backend="torch", **base), 1.0, device)
    assert fast.backend == "triton" and ref.backend == "torch"
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(64, 3, device=device) * 2 - 1
    assert torch.allclose(fast.density(x), ref.density(x), atol=1e-5)
    assert torch.allclose(fast.normal(x), ref.normal(x), atol=1e-4)
    sigma, albedo = fast(torch.zeros(0, 3, device=device))
    assert sigma.shape == (0,) and albedo.shape == (0, 3)


def test_launches_without_fma_contraction(device):
    """Both kernels are launched with the module's compile options (FMA contraction off; the interpreter
    ignores the option, so this is checked on what the launch passes)."""
    from threed.fields import hashgrid_triton

    fast, _ = pair(CONFIGS["dense_and_hashed"], device)
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **options: launched.append((grid, options))

    fast.launch(Recorder(), 1000, torch.zeros(1000, 3), fast.params, torch.zeros(1000, fast.output_dim))
    (grid, options), = launched
    assert grid == (-(-1000 // fast.block), 4)
    assert options["enable_fp_fusion"] is hashgrid_triton.FP_FUSION is False


COMPILE_FOR_GPUS = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from threed.fields import hashgrid_triton as m

levels = {"scales_ptr": "*fp32", "res_ptr": "*i32", "sizes_ptr": "*i64", "dense_ptr": "*i32", "offsets_ptr": "*i64"}
kernels = {
    "forward": (m._hashgrid_fwd, {"x_ptr": "*fp32", "table_ptr": "*fp32", "out_ptr": "*fp32"}),
    "backward": (m._hashgrid_bwd, {"x_ptr": "*fp32", "grad_out_ptr": "*fp32", "grad_table_ptr": "*fp32"}),
}
for arch in (80, 90):
    for name, (fn, pointers) in kernels.items():
        signature = {**pointers, **levels, "n": "i32", "L": "constexpr", "F": "constexpr", "BLOCK": "constexpr"}
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + len(levels))}  # as at run time
        src = ASTSource(fn=fn, signature=signature, constexprs={"L": 16, "F": 2, "BLOCK": m.BLOCK}, attrs=aligned)
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": m.NUM_WARPS, "enable_fp_fusion": m.FP_FUSION}).asm["ptx"]
        assert "fma.rn" not in ptx, f"{name} kernel for sm_{arch} contracts multiply-adds"
        print(f"sm_{arch} {name}: {len(ptx.splitlines())} PTX lines")
'''


def test_kernels_compile_for_gpus(tmp_path):
    """The compiled path, not just the interpreter: both kernels go through Triton's compiler and ptxas for
    sm_80 and sm_90 (no GPU needed), without FMA contraction. In a subprocess, because this session's triton
    was imported in interpreter mode."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("PTX lines") == 4
