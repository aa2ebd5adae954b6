"""DreamGaussian's texture refinement (its main2.py with guidance/sd_utils.py `refine`): no score distillation;
each render is edited by the prior, SDEdit-style, and the texture pulled toward the edit by an MSE.

For a render x (the prior's sample space: Stable Diffusion's latents, the oracle's pixels in [-1, 1]):

    ts      = the DDIM timesteps of `steps` steps, from noisiest   (diffusers' DDIMScheduler, "leading", offset 1)
    k       = int(steps * strength)                                (DreamGaussian: strength 0.8 -> 0.95)
    x_t     = sqrt(abar_ts[k]) x + sqrt(1 - abar_ts[k]) eps           (eps ~ N(0, I))
    then for t in ts[k:]: DDIM (eta 0) with the prior's guided eps (classifier-free guidance as it scores)
    loss    = mean |render - decode(x_0)|^2                         (the edit detached)

A larger strength starts later in the schedule, at less noise: DreamGaussian's strength grows over the stage
from 0.8 (10 of 50 steps, t = 181 of 1000) to 0.95 (3 steps, t = 41), so the edit grows gentler as the texture
settles. `SDEditGuidance` wraps a prior that has `sdedit_space(rgb, cameras, shading, background)`, giving its
sample x, its guided eps function and the map back to colour; the Guidance interface is unchanged, so the
trainer's loop runs it as any other guidance.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.schedule import Schedule

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t (B,)) -> guided eps


def vae_to_rgb(vae: Any, latent_scale: float, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """The map from a latent-diffusion prior's scaled latents back to (B, H, W, 3) colour in [0, 1] through its
    VAE decoder (Stable Diffusion's, Zero123's and MVDream's alike), for their `sdedit_space`."""
    def to_rgb(z: Tensor) -> Tensor:
        image = vae.decode((z / latent_scale).to(dtype), return_dict=False)[0].float()
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)

    return to_rgb


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, offset: int = 1) -> list[int]:
    """The DDIM schedule of `steps` steps, noisiest first, as diffusers' DDIMScheduler.set_timesteps spaces them
    ("leading", steps_offset 1 as Stable Diffusion's scheduler config has it)."""
    ratio = num_train_timesteps // steps
    return [min(i * ratio + offset, num_train_timesteps - 1) for i in reversed(range(steps))]


@torch.no_grad()
def sdedit(x: Tensor, eps_fn: EpsFn, alphas_cumprod: Tensor, steps: int, strength: float,
           generator: torch.Generator | None = None) -> Tensor:
    """x noised to the DDIM timestep int(steps * strength) and denoised by DDIM (eta 0) with `eps_fn` to the end
    (see the module docstring); x unchanged where that start lies past the last step."""
    ts = ddim_timesteps(steps, alphas_cumprod.shape[0])
    start = int(steps * strength)
    if start >= len(ts):
        return x
    ratio = alphas_cumprod.shape[0] // steps
    abar = alphas_cumprod.to(x.device, torch.float32)
    where = generator.device if generator is not None else x.device  # (a CUDA prior's stream is on its device)
    noise = torch.randn(x.shape, generator=generator, device=where).to(x.device, x.dtype)
    a = abar[ts[start]]
    x = a.sqrt() * x + (1 - a).sqrt() * noise
    for t in ts[start:]:
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else abar[0]  # set_alpha_to_one false: the final alpha is abar[0]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


class SDEditGuidance:
    """The Guidance interface over a prior's SDEdit refinement (see the module docstring): the loss is the
    mean squared difference between the renders and their edits; `strength` is a schedule over the stage's
    steps, `steps` the DDIM schedule's length. The prior's random stream (its checkpointed state) draws the
    noise."""

    def __init__(self, prior: Any, strength: Schedule, steps: int) -> None:
        if not hasattr(prior, "sdedit_space"):
            raise ValueError(f"{type(prior).__name__} has no SDEdit refinement")
        self.prior, self.strength, self.steps = prior, strength, steps

    def state_dict(self) -> dict:
        return self.prior.state_dict() if hasattr(self.prior, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.prior, "load_state_dict"):
            self.prior.load_state_dict(state)

    def refine(self, rgb: Tensor, cameras: Any, step: int, shading: str = "albedo",
               background: Tensor | None = None) -> Tensor:
        """(B, H, W, 3) in [0, 1]: the renders as the prior edits them at `step`'s strength (no graph)."""
        with torch.no_grad():
            x, eps_fn, to_rgb, alphas = self.prior.sdedit_space(rgb.detach(), cameras, shading, background)
            out = to_rgb(sdedit(x, eps_fn, alphas, self.steps, float(self.strength(step)), self.prior.generator))
        if out.shape[1:3] != rgb.shape[1:3]:
            out = F.interpolate(out.permute(0, 3, 1, 2), rgb.shape[1:3], mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)
        return out.to(rgb.dtype)

    def __call__(self, rgb: Tensor, cameras: Any, step: int, shading: str = "albedo",
                 background: Tensor | None = None, **_: object) -> dict:
        refined = self.refine(rgb, cameras, step, shading, background)
        return {"loss": F.mse_loss(rgb, refined), "strength": float(self.strength(step))}
