"""MVDream's guidance (Shi et al. 2023): score the views of one object together, conditioned on their cameras.

A batch is objects of `camera.views` (4) consecutive views (threed/cameras.py sample_multiview_cameras).
As MVDream-threestudio's multiview_diffusion_guidance does it:

- the renders are resized to 256x256 and encoded by SD's VAE (the posterior mean, as threed's SD prior);
- one timestep t for the whole batch, t ~ U[t_min, t_max] * T; one noise draw; x_t = q(x_t | x);
- the multi-view UNet predicts the noise of each object's views jointly, with each view's camera
  (threed/guidance/mvdream_unet.py camera_condition) and the prompt, and with the negative prompt;
  classifier-free guidance eps = eps_u + s (eps_c - eps_u), s = guidance.mvdream.guidance_scale (50);
- the x0-reconstruction loss (the paper's Sec. 3.2 and appendix): x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar),
  rescaled towards the spread of the unguided reconstruction x0_c (from eps_c) by
      x0 <- r * x0 * std(x0_c) / std(x0) + (1 - r) * x0,   std over each object's views, r = recon_std_rescale,
  and loss = 0.5 |x - stopgrad(x0)|^2 / B, whose gradient x - x0 is the SDS gradient sigma-weighted by
  sqrt(1 - abar) / sqrt(abar) (without the rescale).

The loss's settings are the mvdream method's own section, guidance.multiview (recon_loss, recon_std_rescale);
the model's are the prior's, guidance.mvdream. `multiview_x0_loss` is that rule on any prior's reconstruction: the oracle prior uses it too, scoring each
4-view group jointly (`MultiViewOracleGuidance`), so the method's batches, cameras and loss are checked
to converge where no weights exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.cameras import Cameras
from threed.errors import UserError
from threed.guidance import RandomStream, sds
from threed.guidance.oracle import OracleGuidance
from threed.prompts import PromptEmbeddings, check_prompt

if TYPE_CHECKING:
    from threed.config import Config


def sample_timestep(cfg, step: int, num_train_timesteps: int, generator: torch.Generator) -> Tensor:  # type: ignore[no-untyped-def]
    """One integer timestep for the whole batch (MVDream-threestudio draws one per step), shape (1,)."""
    return sds.sample_timesteps(cfg, step, 1, num_train_timesteps, generator)


def rescaled_x0(x0: Tensor, x0_cond: Tensor, views: int, rescale: float) -> Tensor:
    """MVDream's std rescale of the guided reconstruction `x0` (B, ...) towards the unguided one's spread:
    per object (`views` consecutive images), std(x0_cond) / std(x0) over all its views' values, mixed by
    `rescale` (0: x0 as it is)."""
    if rescale <= 0:
        return x0
    b = x0.shape[0]
    factor = ((x0_cond.reshape(b // views, -1).std(dim=1) + 1e-8) / (x0.reshape(b // views, -1).std(dim=1) + 1e-8))
    factor = factor.repeat_interleave(views).view(-1, *([1] * (x0.dim() - 1)))
    return rescale * x0 * factor + (1.0 - rescale) * x0


def multiview_x0_loss(x: Tensor, x0: Tensor, x0_cond: Tensor, views: int, rescale: float) -> tuple[Tensor, Tensor]:
    """(loss, grad): 0.5 |x - stopgrad(x0')|^2 / B with x0' the rescaled reconstruction; its gradient per
    image is x - x0'."""
    target = rescaled_x0(x0, x0_cond, views, rescale).detach()
    grad = torch.nan_to_num(x.detach() - target)
    loss = 0.5 * ((x - target) ** 2).sum() / x.shape[0]
    return loss, grad


def _x0(x_t: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    a = abar.view(-1, *([1] * (x_t.dim() - 1)))
    return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()


class MVDreamGuidance(RandomStream):
    """The multi-view prior (threed/guidance/mvdream_checkpoint.py loads it) and MVDream's loss. Frozen; fp16 on
    CUDA with guidance.mvdream.half_precision. Reads guidance.mvdream, the shared t range, the prompts, the
    cameras' views per object and the seed."""

    def __init__(self, cfg: Config, device: str) -> None:
        from threed.guidance.mvdream_checkpoint import load_mvdream

        self.cfg = g = cfg.guidance
        self.mv = mv = g.mvdream
        self.multiview = g.multiview
        self.views = cfg.camera.views
        self.device = torch.device(device)
        self.dtype = torch.float16 if (self.device.type == "cuda" and mv.half_precision) else torch.float32
        check_prompt(cfg.prompt)  # before the 5 GB load
        model = load_mvdream(mv.model, mv.revision, self.dtype)
        self.unet, self.vae, self.text_encoder = (m.to(self.device) for m in (model.unet, model.vae, model.text_encoder))
        self.tokenizer, self.path = model.tokenizer, model.path
        self.num_train_timesteps = int(model.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = model.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        st = self.path.stat()
        self.prompts = PromptEmbeddings(cfg.prompt, cfg.negative_prompt, self.encode_text,
                                        f"mvdream:{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}", cfg.camera,
                                        view_dependent=g.view_dependent_prompting, device=self.device,
                                        dtype=self.dtype)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """(N, 77, D): the text tower's penultimate layer after its final LayerNorm (SD 2's conditioning)."""
        return self.text_encoder(self.tokenizer(texts).to(self.device)).last_hidden_state

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, H, W, 3) in [0, 1] -> scaled latents of the 256x256 resize, differentiable."""
        x = rgb.permute(0, 3, 1, 2)
        size = (self.mv.resolution, self.mv.resolution)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x * 2.0 - 1.0).to(self.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.latent_scale

    def sdedit_space(self, rgb: Tensor, cameras: Cameras, shading: str = "albedo", background: Tensor | None = None):
        """For DreamGaussian's texture refinement (threed/guidance/sdedit.py; its mvdream_utils.py `refine`): the
        renders' latents (256² resize), the guided eps of whole objects (one timestep for the batch, CFG at
        guidance.mvdream.guidance_scale, the cameras' conditioning), the VAE decoder back to (B, 256, 256, 3)
        colour in [0, 1], and the schedule's alphas_cumprod."""
        if rgb.shape[0] % self.views:
            raise UserError(f"MVDream edits whole objects of camera.views={self.views}: a batch of "
                            f"{rgb.shape[0]} is not (set the stage's views and batch_size)")
        from threed.guidance.sdedit import vae_to_rgb

        latents = self.encode_images(rgb).float()
        return (latents, lambda x, t: self.eps(x, t[:1], cameras)[0],
                vae_to_rgb(self.vae, self.latent_scale, self.dtype), self.alphas_cumprod)

    @torch.no_grad()
    def eps(self, x_t: Tensor, t: Tensor, cameras: Cameras) -> tuple[Tensor, Tensor]:
        """(guided, prompt-only) noise predictions for a batch of whole objects."""
        from threed.guidance.mvdream_unet import camera_condition

        cond, uncond = self.prompts.for_cameras(cameras)
        camera = camera_condition(cameras.c2w.float()).to(self.dtype)
        b = x_t.shape[0]
        out = self.unet(torch.cat([x_t, x_t]).to(self.dtype), t.expand(2 * b), torch.cat([cond, uncond]),
                        camera=torch.cat([camera, camera]), num_frames=self.views).float()
        eps_cond, eps_uncond = out.chunk(2)
        return eps_uncond + self.mv.guidance_scale * (eps_cond - eps_uncond), eps_cond

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, **_: object) -> dict[str, Tensor]:
        b = rgb.shape[0]
        if b % self.views:
            raise UserError(f"MVDream scores whole objects of camera.views={self.views}: a batch of {b} is not")
        latents = self.encode_images(rgb)
        t = sample_timestep(self.cfg, step, self.num_train_timesteps, self.generator)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        abar = self.alphas_cumprod[t].expand(b)
        x_t = sds.add_noise(latents.detach(), noise, abar)
        eps, eps_cond = self.eps(x_t, t, cameras)
        if self.multiview.recon_loss:
            loss, grad = multiview_x0_loss(latents, _x0(x_t, eps, abar), _x0(x_t, eps_cond, abar), self.views,
                                           self.multiview.recon_std_rescale)
        else:
            loss, grad = sds.sds_loss(latents, eps, noise, sds.weight(self.cfg.weighting, abar), self.cfg.grad_clip)
        return {"loss": loss, "t": t.float().mean().double() / self.num_train_timesteps, "grad_norm": grad.norm()}


class MultiViewOracleGuidance(OracleGuidance):
    """The oracle prior (threed/guidance/oracle.py) in MVDream's terms: one timestep per batch, each object's
    views denoised jointly (the posterior over its K reference groups shares one weight per group across the
    object's views: a group is the object's cameras, jittered together), and MVDream's x0-reconstruction
    loss with its std rescale (the unguided reconstruction is the oracle's own: there is no CFG), settings
    guidance.multiview."""

    def __init__(self, cfg: Config, device: str) -> None:
        super().__init__(cfg, device)
        self.views = cfg.camera.views
        self.multiview = cfg.guidance.multiview

    def reference_cameras(self, cameras: Cameras) -> list[Cameras]:
        """K camera sets: the given ones, then K-1 with one azimuth/elevation jitter per object."""
        from threed.cameras import make_cameras

        views, b = [cameras], len(cameras)
        for _ in range(self.cfg.oracle.views - 1):
            jitter = (torch.randn(2, b // self.views, generator=self.generator) * self.cfg.oracle.jitter
                      ).repeat_interleave(self.views, dim=1)
            cpu = lambda v: v.detach().cpu().float()  # noqa: E731
            views.append(make_cameras((cpu(cameras.elevation) + jitter[0]).clamp(-89.0, 89.0),
                                      cpu(cameras.azimuth) + jitter[1], cpu(cameras.distance),
                                      torch.rad2deg(cpu(cameras.fovy)), cameras.width, cameras.height,
                                      cpu(cameras.light_position)))
        return views

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, shading: str, background: Tensor,
                 **_: object) -> dict:
        b, k = rgb.shape[0], self.views
        if b % k:
            raise UserError(f"MVDream scores whole objects of camera.views={k}: a batch of {b} is not")
        background = background.detach().to(self.device)
        refs = torch.stack([self.render_reference(c, shading, background) for c in self.reference_cameras(cameras)],
                           dim=1).to(rgb.dtype)  # (B, K, H, W, 3)
        x = 2.0 * rgb - 1.0
        t = sample_timestep(self.cfg, step, self.alphas.shape[0], self.generator)
        abar = self.alphas[t.to(self.device)].to(rgb.device).expand(b)
        noise = torch.randn(rgb.shape, generator=self.generator).to(rgb.device, rgb.dtype)
        with torch.no_grad():
            x0 = joint_x0(x.detach(), 2.0 * refs.to(rgb.device) - 1.0, abar, noise, k)
        if self.multiview.recon_loss:
            loss, grad = multiview_x0_loss(x, x0, x0, k, self.multiview.recon_std_rescale)
        else:  # SDS on the oracle's eps: eps_hat - eps = r (x - x0)
            r = (abar / (1.0 - abar)).sqrt().view(-1, 1, 1, 1)
            loss, grad = sds.sds_loss(x, noise + r * (x.detach() - x0), noise, sds.weight(self.cfg.weighting, abar),
                                      self.cfg.grad_clip)
        return {"loss": loss, "t": float(t.float().mean()) / self.alphas.shape[0],
                "grad_norm": float(grad.flatten(1).norm(dim=1).mean())}


def joint_x0(x: Tensor, refs: Tensor, abar: Tensor, noise: Tensor, views: int) -> Tensor:
    """The optimal denoiser's x0 for groups of `views` images whose K references come in groups: the
    posterior weight of reference group k is a softmax over k of the sum of its views' log-likelihoods
    (oracle.py's residual form), shared by the group's views. x (B, ...), refs (B, K, ...)."""
    b, kk = refs.shape[:2]
    r = (abar / (1.0 - abar)).sqrt().to(x.dtype).view(-1, 1, *([1] * (x.dim() - 1)))
    resid = r * (x[:, None] - refs) + noise[:, None]
    logits = -0.5 * resid.flatten(2).pow(2).sum(-1)  # (B, K)
    weights = torch.softmax(logits.view(b // views, views, kk).sum(1), dim=1).repeat_interleave(views, dim=0)
    if kk == 1:
        return refs[:, 0]
    return (weights.view(b, kk, *([1] * (x.dim() - 1))) * refs).sum(1)


def build_mvdream(cfg: Config, device: str) -> object:
    """The mvdream method's guidance for its prior: the multi-view model, or the oracle scoring groups."""
    if cfg.guidance.type == "oracle":
        return MultiViewOracleGuidance(cfg, device)
    return MVDreamGuidance(cfg, device)
