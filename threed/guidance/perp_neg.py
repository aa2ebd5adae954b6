"""Perp-Neg (Armandpour et al. 2023): view prompts that push away from the other views' prompts.

The Janus problem: asked for "a duck, side view", Stable Diffusion still draws a face, because the side
prompt's score also points toward the front. Perp-Neg replaces each view's prompt by an interpolation
between the front, side and back prompts by the camera's azimuth, and subtracts the scores of the other
views' prompts, keeping of each only its component perpendicular to the positive score, so that what the
view should look like is not cancelled with what it should not:

    e_pos = eps(pos) - eps(uncond)
    eps_hat = eps(uncond) + s * (e_pos + sum_i w_i * perp(eps(neg_i) - eps(uncond), e_pos))
    perp(x, y) = x - (<x, y> / max(<y, y>, 1e-6)) y          (per image, over all its latent values)

with w_i <= 0. The views, the interpolation and the weights are threestudio's (its prompt processor's
get_text_embeddings_perp_neg and its Stable Diffusion guidance), with f(a, b, c; r) = a exp(-b r) + c:

- |azimuth| < 90 (front to side): r = 1 - |azimuth| / 90; the positive prompt r front + (1 - r) side; the
  negatives front and side with weights -f_fs(r) and -f_sf(1 - r);
- |azimuth| >= 90 (side to back): r = 2 - |azimuth| / 90; the positive r side + (1 - r) back; the
  negatives side and front with weights -f_sb(r) and -f_fsb(r);
- overhead views (elevation above camera.overhead_threshold): the overhead prompt and no negatives.

At the pure views a prompt does not push away from itself: f_fs(1) = f_sb(1) = 0 (to 3 decimals with the
default constants). Azimuth 0 is the front, as for threed's view prompts (threed/cameras.py). The
interpolation mixes text embeddings, not prompts, and everything is computed where the cameras live, so a
GPU step does not wait here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from threed.cameras import VIEWS, Cameras, view_indices

if TYPE_CHECKING:
    from threed.config import CameraConfig
    from threed.priors import SDConfig

FRONT, SIDE, BACK, OVERHEAD = (VIEWS.index(v) for v in ("front", "side", "back", "overhead"))
UNCOND = len(VIEWS)  # the row after the views in `embedding_table`: the negative prompt


def shifted_exp_decay(abc: tuple[float, float, float], r: Tensor) -> Tensor:
    """a exp(-b r) + c."""
    a, b, c = abc
    return a * torch.exp(-b * r) + c


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """The part of each x[i] perpendicular to y[i] (B, ...), over all of an image's values; a y of zero
    leaves x as it is."""
    dims = tuple(range(1, x.dim()))
    scale = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp(min=1e-6)
    return x - scale * y


def view_weights(cameras: Cameras, camera_cfg: CameraConfig, sd: SDConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per camera: the positive prompt's mix (B, 5) over `embedding_table`'s rows (front, side, back, overhead,
    the negative prompt), the two negative prompts' rows (B, 2) and their weights (B, 2), as in the module
    docstring."""
    a = cameras.azimuth.double().abs()  # Cameras keep azimuths in [-180, 180): a is in [0, 180]
    overhead = view_indices(cameras, camera_cfg) == OVERHEAD
    front_half = a < 90.0
    r_fs = 1.0 - a / 90.0
    r_sb = 2.0 - a / 90.0
    zero = torch.zeros_like(a)
    mix = torch.stack([torch.where(front_half, r_fs, zero),
                       torch.where(front_half, 1.0 - r_fs, r_sb),
                       torch.where(front_half, zero, 1.0 - r_sb),
                       zero, zero], dim=1)
    mix = torch.where(overhead[:, None], torch.nn.functional.one_hot(
        torch.full_like(a, OVERHEAD, dtype=torch.long), len(VIEWS) + 1).double(), mix)
    rows = torch.stack([torch.where(front_half, FRONT, SIDE), torch.where(front_half, SIDE, FRONT)], dim=1)
    rows = torch.where(overhead[:, None], UNCOND, rows)
    weights = -torch.where(front_half[:, None],
                           torch.stack([shifted_exp_decay(sd.perp_neg_f_fs, r_fs),
                                        shifted_exp_decay(sd.perp_neg_f_sf, 1.0 - r_fs)], dim=1),
                           torch.stack([shifted_exp_decay(sd.perp_neg_f_sb, r_sb),
                                        shifted_exp_decay(sd.perp_neg_f_fsb, r_sb)], dim=1))
    weights = torch.where(overhead[:, None], torch.zeros_like(weights), weights)
    return mix, rows, weights


def embedding_table(cond_table: Tensor, uncond: Tensor) -> Tensor:
    """(len(VIEWS) + 1, L, D): the view prompts' embeddings in VIEWS order (PromptEmbeddings.cond_table), then
    the negative prompt's."""
    return torch.cat([cond_table, uncond[None]])


def prompts_for(table: Tensor, cameras: Cameras, camera_cfg: CameraConfig,
                sd: SDConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(positive (B, L, D), negative prompt (B, L, D), the two negatives (B, 2, L, D), their weights (B, 2))."""
    mix, rows, weights = view_weights(cameras, camera_cfg, sd)
    mix, rows, weights = mix.to(table.device), rows.to(table.device), weights.to(table.device)
    positive = torch.einsum("bk,kld->bld", mix.to(table.dtype), table)
    negatives = table.index_select(0, rows.reshape(-1)).reshape(*rows.shape, *table.shape[1:])
    uncond = table[UNCOND].expand(len(rows), *table.shape[1:])
    return positive, uncond, negatives, weights.float()


def combine(eps_uncond: Tensor, eps_pos: Tensor, eps_neg: Tensor, weights: Tensor, scale: float) -> Tensor:
    """eps(uncond) + s (e_pos + sum_i w_i perp(eps(neg_i) - eps(uncond), e_pos)); eps_neg is (B, 2, ...)."""
    e_pos = eps_pos - eps_uncond
    push = torch.zeros_like(e_pos)
    for i in range(eps_neg.shape[1]):
        w = weights[:, i].view(-1, *([1] * (e_pos.dim() - 1)))
        push = push + w * perpendicular_component(eps_neg[:, i] - eps_uncond, e_pos)
    return eps_uncond + scale * (e_pos + push)
