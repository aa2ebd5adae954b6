"""How well a render reproduces an image: PSNR, SSIM and mask IoU (image-to-3D's reference view).

- PSNR = -10 log10(mean squared error), images in [0, 1].
- SSIM: Wang et al. 2004's, on each colour channel with an 11-pixel Gaussian window (sigma 1.5), constants
  (0.01)^2 and (0.03)^2, valid positions only, averaged (the usual definition of scikit-image and torchmetrics
  with gaussian weights).
- IoU of two masks (opacity and alpha, each > 0.5): |A and B| / |A or B| (1 when both are empty).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> float:
    mse = float((a.float() - b.float()).square().mean())
    return math.inf if mse == 0 else -10.0 * math.log10(mse)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two (H, W, 3) images in [0, 1] (see the module docstring)."""
    x, y = (t.double().permute(2, 0, 1)[:, None] for t in (a, b))  # (3, 1, H, W); float64: E[x^2] - E[x]^2
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :])[None, None]
    blur = lambda t: F.conv2d(t, kernel)  # noqa: E731  (valid positions only)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def mask_iou(a: Tensor, b: Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
