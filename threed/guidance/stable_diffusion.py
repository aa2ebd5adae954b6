"""Score distillation from Stable Diffusion (DreamFusion with a latent diffusion prior).

The render is encoded to SD's latent space, noised to a random timestep, and the frozen UNet predicts the
noise with classifier-free guidance; the SDS gradient w(t) (eps_hat - eps) is applied to the latents and
flows back through the VAE encoder into the render. The UNet runs without a graph: SDS drops its
Jacobian, which is what makes the method affordable.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.cameras import Cameras
from threed.config import CameraConfig, GuidanceConfig
from threed.errors import UserError, first_line
from threed.guidance import sds
from threed.guidance.models import SD_SUBFOLDERS, model_identity, resolve_pretrained
from threed.prompts import PromptEmbeddings, check_prompt


class StableDiffusionGuidance:
    """The Guidance interface over a diffusers Stable Diffusion folder (unet, vae, text_encoder, tokenizer,
    scheduler). Weights are frozen; fp16 on CUDA when `guidance.sd.half_precision`, fp32 otherwise."""

    def __init__(self, cfg: GuidanceConfig, prompt: str, negative_prompt: str, camera_cfg: CameraConfig,
                 device: str, seed: int) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        self.cfg = cfg
        self.sd = sd = cfg.sd
        self.device = torch.device(device)
        self.dtype = torch.float16 if (self.device.type == "cuda" and sd.half_precision) else torch.float32
        check_prompt(prompt)  # before any download or load: a typo should cost no time
        self.path = resolve_pretrained(sd.model, "Stable Diffusion", required=SD_SUBFOLDERS)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-load bar for a local folder is noise in the run's output
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", dtype=self.dtype)
            self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", torch_dtype=self.dtype)
            self.unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", torch_dtype=self.dtype)
            self.scheduler = DDPMScheduler.from_pretrained(self.path, subfolder="scheduler")
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load Stable Diffusion from '{self.path}': {first_line(e)}; pass a complete "
                            f"diffusers folder or hub id") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
        if self.device.type == "cuda":
            self.vae.to(memory_format=torch.channels_last)
            self.unet.to(memory_format=torch.channels_last)

        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"Stable Diffusion model '{sd.model}' predicts '{self.prediction_type}'; "
                            f"use a model that predicts epsilon or v")
        # Latent pixels per image pixel: the VAE halves the size once per block after the first.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_scale = float(self.vae.config.scaling_factor)
        if sd.resolution % self.vae_scale_factor:
            raise UserError(f"bad value for 'guidance.sd.resolution': {sd.resolution} is not a multiple of the VAE's "
                            f"downsampling factor {self.vae_scale_factor}")

        self.generator = torch.Generator().manual_seed(seed)
        self.prompts = PromptEmbeddings(prompt, negative_prompt, self.encode_text,
                                        model_identity(self.path), camera_cfg,
                                        view_dependent=cfg.view_dependent_prompting,
                                        device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """(N, L, D) last hidden states of the text encoder for padded prompts (what SD's UNet attends to)."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, H, W, 3) in [0, 1] -> scaled latents (B, C, h, w), differentiable.

        Uses the posterior mean, not a sample: SD's encoder posterior is narrow, a sample would only add
        noise to the gradient through the encoder, and the SDS noise already supplies the randomness.
        """
        x = rgb.permute(0, 3, 1, 2)
        size = (self.sd.resolution, self.sd.resolution)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = (x * 2.0 - 1.0).to(self.dtype)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean * self.latent_scale

    def noise_prediction(self, latents_noisy: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        """Classifier-free guided epsilon: uncond + scale * (cond - uncond), without a graph."""
        with torch.no_grad():
            x_in = torch.cat([latents_noisy, latents_noisy]).to(self.dtype)
            t_in = torch.cat([t, t])
            out = self.unet(x_in, t_in, encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
            if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
                abar = self.alphas_cumprod[t_in].view(-1, 1, 1, 1)
                out = abar.sqrt() * out + (1.0 - abar).sqrt() * x_in.float()
            eps_uncond, eps_cond = out.chunk(2)
            return eps_uncond + self.sd.guidance_scale * (eps_cond - eps_uncond)

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, shading: str = "albedo",
                 background: Tensor | None = None, **_: object) -> dict[str, Tensor | float]:
        batch = rgb.shape[0]
        latents = self.encode_images(rgb).float()
        t = sds.sample_timesteps(self.cfg, step, batch, self.num_train_timesteps, self.generator).to(self.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        latents_noisy = self.scheduler.add_noise(latents.detach(), noise, t)
        cond, uncond = self.prompts.for_cameras(cameras)
        eps_hat = self.noise_prediction(latents_noisy, t, cond, uncond)
        w = sds.weight(self.cfg.weighting, self.alphas_cumprod[t])
        loss, grad = sds.sds_loss(latents, eps_hat, noise, w, self.cfg.grad_clip)
        return {"loss": loss, "t": float(t.float().mean()) / self.num_train_timesteps,
                "grad_norm": float(grad.norm())}

    @property
    def model_dir(self) -> Path:
        return Path(self.path)
