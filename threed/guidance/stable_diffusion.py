"""Score distillation from Stable Diffusion (DreamFusion with a latent diffusion prior).

The render is encoded to SD's latent space, noised to a random timestep, and the frozen UNet predicts the
noise with classifier-free guidance; the SDS gradient w(t) (eps_hat - eps) is applied to the latents and
flows back through the VAE encoder into the render. The UNet runs without a graph: SDS drops its
Jacobian, which is what makes the method affordable.

On a GPU both networks are compiled (threed/guidance/compile.py) and a step never waits for the device:
timesteps and noise are drawn there, the view prompts are picked there, and the statistics come back as
tensors that the trainer reads only when it logs. `guidance.sd.vae: tiny` swaps SD's VAE encoder for a
distilled AutoencoderTiny (TAESD) into the same latent space: cheaper, but another function of the render.
`guidance.sd.perp_neg` guides with Perp-Neg (threed/guidance/perp_neg.py) instead of plain classifier-free
guidance on the view prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.cameras import Cameras
from threed.errors import UserError, first_line
from threed.guidance import RandomStream, sds
from threed.guidance import compile as compiling
from threed.guidance import perp_neg
from threed.guidance.hub import SD_SUBFOLDERS, model_identity, pinned_revision, resolve_pretrained
from threed.prompts import PromptEmbeddings, check_prompt

if TYPE_CHECKING:
    from threed.config import Config


class StableDiffusionGuidance(RandomStream):
    """The Guidance interface over a diffusers Stable Diffusion folder (unet, vae, text_encoder, tokenizer,
    scheduler). Weights are frozen; fp16 on CUDA when `guidance.sd.half_precision`, fp32 otherwise. It reads
    the run config's guidance section (guidance.sd and the shared SDS settings), prompts, cameras and seed."""

    def __init__(self, cfg: Config, device: str) -> None:
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        self.cfg = g = cfg.guidance
        self.sd = sd = g.sd
        self.device = torch.device(device)
        self.dtype = torch.float16 if (self.device.type == "cuda" and sd.half_precision) else torch.float32
        self.tiny_vae = sd.vae == "tiny"
        check_prompt(cfg.prompt)  # before any download or load: a typo should cost no time
        # With the tiny autoencoder, SD's own VAE is neither needed nor downloaded.
        required = tuple(p for p in SD_SUBFOLDERS if not (self.tiny_vae and p == "vae"))
        self.path = resolve_pretrained(sd.model, "Stable Diffusion", required=required,
                                       revision=pinned_revision(sd.model, sd.revision))
        tiny_path = (resolve_pretrained(sd.tiny_vae_model, "tiny autoencoder (guidance.sd.vae=tiny)",
                                        required=("config.json",),
                                        extra_patterns=("diffusion_pytorch_model.safetensors",),
                                        local_hint="guidance.sd.tiny_vae_model=/path/to/an/AutoencoderTiny/folder")
                     if self.tiny_vae else None)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-load bar for a local folder is noise in the run's output
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", dtype=self.dtype)
            if not self.tiny_vae:
                self.vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", torch_dtype=self.dtype)
            self.unet = UNet2DConditionModel.from_pretrained(self.path, subfolder="unet", torch_dtype=self.dtype)
            self.scheduler = DDPMScheduler.from_pretrained(self.path, subfolder="scheduler")
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load Stable Diffusion from '{self.path}': {first_line(e)}; pass a complete "
                            f"diffusers folder or hub id") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if tiny_path is not None:
            from diffusers.utils import logging as diffusers_logging

            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its config carries a key its class ignores: noise
            try:
                self.vae = AutoencoderTiny.from_pretrained(tiny_path, torch_dtype=self.dtype)
            except (OSError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot load the tiny autoencoder from '{tiny_path}': {first_line(e)}; pass an "
                                f"AutoencoderTiny folder or hub id as guidance.sd.tiny_vae_model") from None
            finally:
                diffusers_logging.set_verbosity(verbosity)
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
        # Latent pixels per image pixel: the encoder halves the size once per block after the first.
        blocks = self.vae.config.encoder_block_out_channels if self.tiny_vae else self.vae.config.block_out_channels
        self.vae_scale_factor = 2 ** (len(blocks) - 1)
        # SD's VAE latents are scaled by 0.18215 for the UNet; TAESD's come scaled already (factor 1).
        self.latent_scale = float(self.vae.config.scaling_factor)
        if sd.resolution % self.vae_scale_factor:
            raise UserError(f"bad value for 'guidance.sd.resolution': {sd.resolution} is not a multiple of the VAE's "
                            f"downsampling factor {self.vae_scale_factor}")
        if self.vae.config.latent_channels != self.unet.config.in_channels:
            raise UserError(f"the autoencoder '{sd.tiny_vae_model if self.tiny_vae else self.path}' has "
                            f"{self.vae.config.latent_channels} latent channels but the UNet takes "
                            f"{self.unet.config.in_channels}: use an autoencoder of this model's latent space")

        # Timesteps and noise are drawn on the device: a CPU draw copied over would wait for the GPU.
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.prompts = PromptEmbeddings(cfg.prompt, cfg.negative_prompt, self.encode_text,
                                        model_identity(self.path), cfg.camera,
                                        view_dependent=g.view_dependent_prompting,
                                        device=self.device, dtype=self.dtype)
        self.camera_cfg = cfg.camera
        self.perp_neg_table = (perp_neg.embedding_table(self.prompts.cond_table, self.prompts.uncond)
                               if sd.perp_neg else None)

        # The two frozen networks, compiled at their first call where the config says so.
        vae_mode = compiling.resolve_mode(sd.compile_vae, self.device, on_cuda="default")
        unet_mode = compiling.resolve_mode(sd.compile, self.device, on_cuda="reduce-overhead")
        self._encode = compiling.maybe_compile(self._encode_eager, vae_mode,
                                               "tiny VAE encoder" if self.tiny_vae else "VAE encoder",
                                               differentiable=True)
        self._noise = compiling.maybe_compile(self._noise_eager, unet_mode, "UNet")
        self._perp_neg = (compiling.maybe_compile(self._perp_neg_eager, unet_mode, "UNet (Perp-Neg)")
                          if sd.perp_neg else None)
        self.cudagraphs = any(compiling.uses_cudagraphs(m) for m in (vae_mode, unet_mode))
        self.compile_time_s: float | None = None  # set after the first call when something was compiled
        self._reported = False

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """(N, L, D) last hidden states of the text encoder for padded prompts (what SD's UNet attends to)."""
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, H, W, 3) in [0, 1] -> scaled latents (B, C, h, w), differentiable (compiled where configured).

        The render comes in one layout whatever the shading produced (a textureless render may be an
        expanded view), so a compiled encoder sees one input signature and compiles once."""
        return self._encode(rgb.float().contiguous())

    def _encode_eager(self, rgb: Tensor) -> Tensor:
        """Resize to the encoder's resolution (bilinear; enlarging needs no antialiasing), map to [-1, 1]
        and encode.

        SD's VAE: the posterior mean, not a sample: its posterior is narrow, a sample would only add noise
        to the gradient through the encoder, and the SDS noise already supplies the randomness. The tiny
        autoencoder is deterministic.
        """
        x = rgb.permute(0, 3, 1, 2)
        size = (self.sd.resolution, self.sd.resolution)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = (x * 2.0 - 1.0).to(self.dtype)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.tiny_vae:
            latents = self.vae.encode(x, return_dict=False)[0]
        else:
            latents = self.vae.encode(x, return_dict=False)[0].mean
        return latents * self.latent_scale

    def guided_eps(self, latents_noisy: Tensor, t: Tensor, cameras: Cameras) -> Tensor:
        """The guided noise prediction for the cameras' views: classifier-free guidance on each view's
        prompt, or Perp-Neg (`guidance.sd.perp_neg`) on the prompts it mixes; without a graph."""
        if self._perp_neg is not None:
            pos, uncond, neg, weights = perp_neg.prompts_for(self.perp_neg_table, cameras, self.camera_cfg, self.sd)
            with torch.no_grad():
                return self._perp_neg(latents_noisy, t, pos, uncond, neg, weights)
        cond, uncond = self.prompts.for_cameras(cameras)
        return self.noise_prediction(latents_noisy, t, cond, uncond)

    def noise_prediction(self, latents_noisy: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        """Classifier-free guided epsilon: uncond + scale * (cond - uncond), without a graph (compiled
        where configured)."""
        with torch.no_grad():
            return self._noise(latents_noisy, t, cond, uncond)

    def _eps(self, x_in: Tensor, t_in: Tensor, text: Tensor) -> Tensor:
        """The UNet's noise prediction (float32) for a batch, from v where the model predicts v."""
        out = self.unet(x_in, t_in, encoder_hidden_states=text, return_dict=False)[0].float()
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            abar = self.alphas_cumprod[t_in].view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * x_in.float()
        return out

    def _noise_eager(self, latents_noisy: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        x_in = torch.cat([latents_noisy, latents_noisy]).to(self.dtype)
        eps_uncond, eps_cond = self._eps(x_in, torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        return eps_uncond + self.sd.guidance_scale * (eps_cond - eps_uncond)

    def _perp_neg_eager(self, latents_noisy: Tensor, t: Tensor, pos: Tensor, uncond: Tensor, neg: Tensor,
                        weights: Tensor) -> Tensor:
        """Perp-Neg's guided epsilon (threed/guidance/perp_neg.py): one UNet batch of the positive, the
        negative prompt and the two negatives."""
        x_in = torch.cat([latents_noisy] * 4).to(self.dtype)
        out = self._eps(x_in, torch.cat([t] * 4), torch.cat([pos, uncond, neg[:, 0], neg[:, 1]]))
        eps_pos, eps_uncond, eps_neg0, eps_neg1 = out.chunk(4)
        return perp_neg.combine(eps_uncond, eps_pos, torch.stack([eps_neg0, eps_neg1], dim=1), weights,
                                self.sd.guidance_scale)

    def sdedit_space(self, rgb: Tensor, cameras: Cameras, shading: str = "albedo", background: Tensor | None = None):
        """For DreamGaussian's texture refinement (threed/guidance/sdedit.py): the renders' latents, the guided
        eps of the cameras' prompts (classifier-free guidance at guidance.sd.guidance_scale), the VAE decoder
        back to (B, H, W, 3) colour in [0, 1], and the schedule's alphas_cumprod."""
        from threed.guidance.sdedit import vae_to_rgb

        latents = self.encode_images(rgb).float()
        return (latents, lambda x, t: self.guided_eps(x, t, cameras).float(),
                vae_to_rgb(self.vae, self.latent_scale, self.dtype), self.alphas_cumprod)

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, shading: str = "albedo",
                 background: Tensor | None = None, **_: object) -> dict[str, Tensor]:
        """The SDS loss of a batch of renders, and its timestep and gradient norm as device tensors (reading
        them would wait for the GPU: the trainer does so only when it logs)."""
        if self.cudagraphs:
            compiling.new_iteration()
        batch = rgb.shape[0]
        if shading == "normal_latent":  # Fantasia3D's warm-up: the normal-and-mask render is the latent itself
            size = self.sd.resolution // 8
            latents = F.interpolate(rgb.permute(0, 3, 1, 2).float(), (size, size), mode="bilinear",
                                    align_corners=False)
        else:
            latents = self.encode_images(rgb).float()
        t = sds.sample_timesteps(self.cfg, step, batch, self.num_train_timesteps, self.generator)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        abar = self.alphas_cumprod[t]
        latents_noisy = sds.add_noise(latents.detach(), noise, abar)
        eps_hat = self.guided_eps(latents_noisy, t, cameras)
        w = sds.weight(self.cfg.weighting, abar)
        loss, grad = sds.sds_loss(latents, eps_hat, noise, w, self.cfg.grad_clip)
        if not self._reported:
            self._report_compile()
        return {"loss": loss, "t": t.float().mean().double() / self.num_train_timesteps, "grad_norm": grad.norm()}

    def _report_compile(self) -> None:
        """After the first call: one line on the compile time (where something was compiled)."""
        from tqdm import tqdm

        self._reported = True
        parts = [self._encode, self._noise if self._perp_neg is None else self._perp_neg]
        line = compiling.report(parts)
        if line is not None:
            self.compile_time_s = sum(p.seconds or 0.0 for p in parts if isinstance(p, compiling.CompiledFunction))
            tqdm.write(f"threed: {line}")

    @property
    def model_dir(self) -> Path:
        return Path(self.path)
