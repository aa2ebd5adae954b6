"""Score distillation sampling (DreamFusion): timesteps, weighting w(t), and the SDS loss.

The update for a differentiable image (or latent) x is  grad_x = w(t) * (eps_hat(x_t; y, t) - eps),
with the UNet Jacobian skipped. We write it as an MSE to a detached target,

    loss = 0.5 * || x - stopgrad(x - grad) ||^2 / B,

so backprop gives exactly `grad / B` and the loss value (0.5 |grad|^2 / B) shows the gradient's size.
Every prior (Stable Diffusion, the oracle) goes through `sds_loss`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from threed.config import GuidanceConfig


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled_linear" schedule: alpha_bar_t for t = 0..T-1."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def sample_timesteps(cfg: GuidanceConfig, step: int, batch: int, num_train_timesteps: int,
                     generator: torch.Generator) -> Tensor:
    """Integer timesteps t ~ U[t_min, t_max] * T, one per image (long, on the generator's device); both
    ends are schedules over the training step."""
    lo = int(cfg.t_min(step) * num_train_timesteps)
    hi = max(lo, int(cfg.t_max(step) * num_train_timesteps))
    return torch.randint(lo, hi + 1, (batch,), generator=generator,
                         device=generator.device).clamp_(0, num_train_timesteps - 1)


def add_noise(x: Tensor, noise: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """The forward diffusion x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps, alpha_bar_t per image
    (shape (B,)). DDPMScheduler.add_noise computes the same, with a device copy and reshapes per call."""
    abar = alphas_cumprod_t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return abar.sqrt() * x + (1.0 - abar).sqrt() * noise


def weight(kind: str, alphas_cumprod_t: Tensor) -> Tensor:
    """w(t), by threestudio's names (models/guidance/stable_diffusion_guidance.py, weighting_strategy):
    "sds" = 1 - alpha_bar = sigma_t^2 (DreamFusion; stable-dreamfusion's only one), "uniform" = 1 (threestudio's
    Magic3D coarse stage), "fantasia3d" = sqrt(alpha_bar) (1 - alpha_bar) (Fantasia3D: vanishes at both ends of
    the noise range, largest at alpha_bar = 1/3)."""
    if kind == "sds":
        return 1.0 - alphas_cumprod_t
    if kind == "uniform":
        return torch.ones_like(alphas_cumprod_t)
    if kind == "fantasia3d":
        return alphas_cumprod_t.sqrt() * (1.0 - alphas_cumprod_t)
    raise ValueError(f"unknown SDS weighting {kind!r}")


def sds_loss(x: Tensor, noise_pred: Tensor, noise: Tensor, w: Tensor, grad_clip: float = -1.0) -> tuple[Tensor, Tensor]:
    """SDS as an MSE to a detached target. `w` broadcasts over x's batch (shape (B,)).

    Returns (loss, grad) where grad = w * (noise_pred - noise), NaNs zeroed, optionally clipped.
    """
    w = w.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    grad = w * (noise_pred.to(x.dtype) - noise.to(x.dtype))
    grad = torch.nan_to_num(grad.detach())
    if grad_clip > 0:
        grad = grad.clamp(-grad_clip, grad_clip)
    target = (x - grad).detach()
    loss = 0.5 * ((x - target) ** 2).sum() / x.shape[0]
    return loss, grad
