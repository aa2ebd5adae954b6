"""The multiresolution hash encoding as two Triton kernels: no build step, any CUDA GPU Triton supports.

It computes TorchHashGrid's function (threed/fields/hashgrid.py, tiny-cuda-nn's layout and hash) from the
same flat `params` table, so checkpoints move freely between the backends:

    pos = x * s_l + 0.5,  g = floor(pos),  f = pos - g           (per axis, level l)
    corner c = g + b, b in {0, 1}^3, weight prod_d (b_d ? f_d : 1 - f_d)
    index(c) = (c_x + c_y r + c_z r^2) mod size_l                 dense level (r^3 <= size_l)
             = (c_x * 1 ^ c_y * 2654435761 ^ c_z * 805459861) mod 2^32 mod size_l   hashed level
    out[n, l F + f] = sum_c weight_c * table[offset_l + index(c), f]

The hash is taken in uint32 arithmetic, whose wraparound is the "mod 2^32"; a hashed level's table size is
2^log2_hashmap_size, a power of two, so "mod size" is a bit mask there. Table and point offsets are int64.

Both kernels are compiled without FMA contraction, so pos = x * s + 0.5 and the weights round exactly as
in PyTorch: with contraction, pos at the finest level (s ~ 2047) moves by up to one float32 ulp, 2.4e-4 of a
cell, and the two backends would agree only to ~1e-3 of the table's scale instead of to float rounding.
That costs a few arithmetic instructions in kernels whose time goes to the eight random table reads.

The forward kernel interpolates; the backward kernel scatters weight * grad into the table's gradient with
atomic adds. There is no gradient with respect to x: when x requires one (analytic normals), the forward
falls back to the PyTorch implementation of the same function, which is differentiable in x (and twice).
The kernels run on CPU tensors too under TRITON_INTERPRET=1 (slowly; for tests). Importing this module
imports triton: it is imported only when the Triton backend is chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from threed.config import FieldConfig
from threed.errors import UserError
from threed.fields.hashgrid import TorchHashGrid

BLOCK = 256  # points per program
NUM_WARPS = 4
FP_FUSION = False  # no FMA contraction: positions and weights round as in PyTorch (see above)


@triton.jit
def _corner(gx, gy, gz, fx, fy, fz, res, size, dense, c: tl.constexpr):
    """Table row (uint32, within the level) and trilinear weight of corner `c` (bits: x, y, z) of every point."""
    if (c & 1) == 1:
        cx = gx + 1
        wx = fx
    else:
        cx = gx
        wx = 1.0 - fx
    if (c & 2) == 2:
        cy = gy + 1
        wy = fy
    else:
        cy = gy
        wy = 1.0 - fy
    if (c & 4) == 4:
        cz = gz + 1
        wz = fz
    else:
        cz = gz
        wz = 1.0 - fz
    weight = wx * wy * wz  # (wx * wy) * wz, as TorchHashGrid multiplies them
    dense_index = (cx + cy * res + cz * (res * res)) % size
    hashed_index = (cx * 1 ^ cy * 2654435761 ^ cz * 805459861) & (size - 1)
    return tl.where(dense, dense_index, hashed_index), weight


@triton.jit
def _level_setup(x_ptr, scales_ptr, res_ptr, sizes_ptr, dense_ptr, offsets_ptr, level, offs, mask):
    """Per-point lattice cell and fraction at `level`, plus the level's constants."""
    scale = tl.load(scales_ptr + level)
    res = tl.load(res_ptr + level).to(tl.uint32)
    size = tl.load(sizes_ptr + level).to(tl.uint32)
    dense = tl.load(dense_ptr + level) != 0
    offset = tl.load(offsets_ptr + level)  # int64
    row = offs.to(tl.int64) * 3
    x = tl.minimum(tl.maximum(tl.load(x_ptr + row, mask=mask, other=0.0), 0.0), 1.0)
    y = tl.minimum(tl.maximum(tl.load(x_ptr + row + 1, mask=mask, other=0.0), 0.0), 1.0)
    z = tl.minimum(tl.maximum(tl.load(x_ptr + row + 2, mask=mask, other=0.0), 0.0), 1.0)
    px = x * scale + 0.5
    py = y * scale + 0.5
    pz = z * scale + 0.5
    fx_ = tl.floor(px)
    fy_ = tl.floor(py)
    fz_ = tl.floor(pz)
    gx = fx_.to(tl.int32).to(tl.uint32)  # pos >= 0.5 for x in [0, 1]: a plain non-negative cell index
    gy = fy_.to(tl.int32).to(tl.uint32)
    gz = fz_.to(tl.int32).to(tl.uint32)
    return gx, gy, gz, px - fx_, py - fy_, pz - fz_, res, size, dense, offset


@triton.jit(do_not_specialize=["n"])  # the point count changes every call: compile once, not per divisibility
def _hashgrid_fwd(x_ptr, table_ptr, out_ptr, scales_ptr, res_ptr, sizes_ptr, dense_ptr, offsets_ptr, n,
                  L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    level = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gx, gy, gz, fx, fy, fz, res, size, dense, offset = _level_setup(
        x_ptr, scales_ptr, res_ptr, sizes_ptr, dense_ptr, offsets_ptr, level, offs, mask)
    feat = tl.arange(0, F)
    mask2 = mask[:, None]
    acc = tl.zeros([BLOCK, F], dtype=tl.float32)
    for c in tl.static_range(8):
        index, weight = _corner(gx, gy, gz, fx, fy, fz, res, size, dense, c)
        rows = (offset + index.to(tl.int64)) * F
        values = tl.load(table_ptr + rows[:, None] + feat[None, :], mask=mask2, other=0.0)
        acc += weight[:, None] * values
    out = offs.to(tl.int64)[:, None] * (L * F) + level * F + feat[None, :]
    tl.store(out_ptr + out, acc, mask=mask2)


@triton.jit(do_not_specialize=["n"])
def _hashgrid_bwd(x_ptr, grad_out_ptr, grad_table_ptr, scales_ptr, res_ptr, sizes_ptr, dense_ptr, offsets_ptr,
                  n, L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    level = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gx, gy, gz, fx, fy, fz, res, size, dense, offset = _level_setup(
        x_ptr, scales_ptr, res_ptr, sizes_ptr, dense_ptr, offsets_ptr, level, offs, mask)
    feat = tl.arange(0, F)
    mask2 = mask[:, None]
    grad = tl.load(grad_out_ptr + offs.to(tl.int64)[:, None] * (L * F) + level * F + feat[None, :], mask=mask2,
                   other=0.0)
    for c in tl.static_range(8):
        index, weight = _corner(gx, gy, gz, fx, fy, fz, res, size, dense, c)
        rows = (offset + index.to(tl.int64)) * F
        tl.atomic_add(grad_table_ptr + rows[:, None] + feat[None, :], weight[:, None] * grad, mask=mask2,
                      sem="relaxed")


class _HashGridFunction(torch.autograd.Function):
    """x (N, 3) in [0, 1], the flat table -> (N, L * F); differentiable in the table only."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, grid: "TritonHashGrid") -> Tensor:  # type: ignore[override]
        n = x.shape[0]
        out = torch.empty(n, grid.output_dim, device=x.device, dtype=torch.float32)
        if n > 0:
            grid.launch(_hashgrid_fwd, n, x, params, out)
        ctx.save_for_backward(x)
        ctx.grid = grid
        ctx.table_numel = params.numel()
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        grid = ctx.grid
        grad_table = None
        if ctx.needs_input_grad[1]:
            grad_table = torch.zeros(ctx.table_numel, device=x.device, dtype=torch.float32)
            n = x.shape[0]
            if n > 0:
                grid.launch(_hashgrid_bwd, n, x, grad_out.contiguous().float(), grad_table)
        return None, grad_table, None


class TritonHashGrid(TorchHashGrid):
    """TorchHashGrid's encoding and parameters, evaluated by fused Triton kernels.

    Same `params` (and so the same checkpoint keys); the per-level constants live in non-persistent buffers.
    """

    def __init__(self, cfg: FieldConfig, block: int = BLOCK, num_warps: int = NUM_WARPS):
        super().__init__(cfg)
        if self.n_features & (self.n_features - 1):
            raise UserError(f"field.n_features_per_level={self.n_features} is not supported by field.backend=triton: "
                            "use 1, 2, 4 or 8 (as tiny-cuda-nn), or field.backend=torch")
        self.n_levels = cfg.n_levels
        self.block, self.num_warps = block, num_warps
        cap = 2**cfg.log2_hashmap_size
        dense = [resolution**3 <= size for _, resolution, size in self.layout]
        # a hashed level's table is the full 2^log2_hashmap_size, so the kernel's "mod size" can be a mask
        assert all(d or size == cap for d, (_, _, size) in zip(dense, self.layout))
        assert all(size < 2**32 for _, _, size in self.layout)
        self.register_buffer("level_scales", torch.tensor([s for s, _, _ in self.layout], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("level_resolutions", torch.tensor([r for _, r, _ in self.layout], dtype=torch.int32),
                             persistent=False)
        self.register_buffer("level_sizes", torch.tensor([s for _, _, s in self.layout], dtype=torch.int64),
                             persistent=False)
        self.register_buffer("level_dense", torch.tensor(dense, dtype=torch.int32), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(self.offsets[:-1], dtype=torch.int64), persistent=False)

    def launch(self, kernel, n: int, *tensors: Tensor) -> None:
        """Run `kernel` over n points x all levels, with the per-level constants and compile options."""
        kernel[(triton.cdiv(n, self.block), self.n_levels)](
            *tensors, self.level_scales, self.level_resolutions, self.level_sizes, self.level_dense,
            self.level_offsets, n, L=self.n_levels, F=self.n_features, BLOCK=self.block, num_warps=self.num_warps,
            enable_fp_fusion=FP_FUSION)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3) in [0, 1] (clamped) -> (N, n_levels * n_features)."""
        if x.requires_grad and torch.is_grad_enabled():
            return super().forward(x)  # d/dx is needed (analytic normals): the PyTorch path has it
        x = x.detach().to(torch.float32).contiguous()
        return _HashGridFunction.apply(x, self.params, self)
