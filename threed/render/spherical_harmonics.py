"""View-dependent colour of a 3D Gaussian from real spherical harmonics up to degree 3, in 3DGS's order and
signs (its `eval_sh`; gsplat's `spherical_harmonics` agrees, tests/test_spherical_harmonics.py checks it
against gsplat's PyTorch reference):

    colour(d) = max(0, 0.5 + Σ_k Y_k(d) f_k),   d the unit direction from the camera's centre to the Gaussian,

f_0 the degree-0 coefficients (`f_dc`, Y_0 = 1 / (2 √π): threed.render.splat.sh0_to_rgb) and f_1.. the
higher degrees' (`f_rest`, (degree + 1)² - 1 rows). Order, signs and direction are 3DGS's so that the
coefficients a run writes to its .ply (exporters/splat_ply.py) show the same colours in splat viewers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from threed.render.splat import SH_C0

MAX_DEGREE = 3
C1 = math.sqrt(3.0 / (4.0 * math.pi))
C2_XY = 0.5 * math.sqrt(15.0 / math.pi)  # the xy, yz and xz terms
C2_ZZ = 0.25 * math.sqrt(5.0 / math.pi)
C2_XX = 0.25 * math.sqrt(15.0 / math.pi)
C3_0 = 0.25 * math.sqrt(35.0 / (2.0 * math.pi))
C3_1 = 0.5 * math.sqrt(105.0 / math.pi)
C3_2 = 0.25 * math.sqrt(21.0 / (2.0 * math.pi))
C3_3 = 0.25 * math.sqrt(7.0 / math.pi)
C3_4 = 0.25 * math.sqrt(105.0 / math.pi)


def coefficients(degree: int) -> int:
    """How many coefficients per colour channel a degree has beyond the constant one: (degree + 1)² - 1."""
    return (degree + 1) ** 2 - 1


def sh_basis(directions: Tensor, degree: int) -> Tensor:
    """(..., 3) unit directions -> (..., (degree + 1)²) the basis functions Y_0..."""
    if not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"spherical-harmonic degree {degree} is not in [0, {MAX_DEGREE}]")
    x, y, z = directions.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [C2_XY * x * y, -C2_XY * y * z, C2_ZZ * (2 * zz - xx - yy), -C2_XY * x * z, C2_XX * (xx - yy)]
    if degree >= 3:
        out += [-C3_0 * y * (3 * xx - yy), C3_1 * x * y * z, -C3_2 * y * (4 * zz - xx - yy),
                C3_3 * z * (2 * zz - 3 * xx - 3 * yy), -C3_2 * x * (4 * zz - xx - yy), C3_4 * z * (xx - yy),
                -C3_0 * x * (xx - 3 * yy)]
    return torch.stack(out, dim=-1)


def sh_to_rgb(f_dc: Tensor, f_rest: Tensor, directions: Tensor, degree: int) -> Tensor:
    """Colours of N Gaussians seen along `directions` ((..., N, 3), any length: normalised here): (N, 3)
    `f_dc` and (N, K, 3) `f_rest`, of which the first coefficients(degree) rows count -> (..., N, 3)."""
    basis = sh_basis(directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12), degree)
    rgb = basis[..., :1] * f_dc + 0.5
    if degree > 0:
        rgb = rgb + torch.einsum("...nk,nkc->...nc", basis[..., 1:], f_rest[:, :coefficients(degree)])
    return rgb.clamp_min(0.0)
