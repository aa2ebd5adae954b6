"""Score distillation from Zero-1-to-3: the input image's object, seen from the training camera.

Zero123 is Stable Diffusion fine-tuned on renders of objects: its UNet takes 8 input channels, the noisy
latent of the novel view and the (unscaled) latent of the reference image, and attends to one token: the
reference's CLIP image embedding joined with the relative camera (4 numbers) through a linear projection.
Classifier-free guidance drops both conditions (zero latent, zero token), as Zero123 was trained.

The relative camera (`relative_camera`), with elevation and azimuth in degrees as threed's cameras give them
(threed/cameras.py: elevation above the horizontal plane, azimuth counter-clockwise seen from above, as in
Zero123's and threestudio's frames) and Zero123's polar angle = 90 - elevation:

    [ radians(polar - polar_ref),  sin(radians(azimuth - azimuth_ref)),  cos(radians(azimuth - azimuth_ref)),  x ]

with x = distance - distance_ref for Zero123 and Zero123-XL, and x = radians(polar_ref) for Stable Zero123
(its training replaced the distance by the reference's polar angle; guidance.zero123.camera). The sine and
cosine make the azimuth wrap exact: -170 and 190 degrees give the same numbers.

Everything else is the SDS of threed/guidance/sds.py: the render is encoded at 256x256 (Zero123's size),
noised, denoised with CFG 3 (Stable Zero123's), and w(t) = 1 - alpha_bar.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.cameras import Cameras
from threed.guidance import RandomStream, sds
from threed.guidance.zero123_model import load_zero123

if TYPE_CHECKING:
    from threed.config import Config

# CLIP's image normalisation (OpenAI's ViT-L/14, which Zero123's image embedder is)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def relative_camera(elevation: Tensor, azimuth: Tensor, distance: Tensor, ref_elevation: float, ref_azimuth: float,
                    ref_distance: float, variant: str = "stable") -> Tensor:
    """(B, 4) Zero123's camera condition for views at (elevation, azimuth, distance) (degrees, degrees, scene
    units; each (B,)) relative to the reference view's (see the module docstring)."""
    polar, ref_polar = 90.0 - elevation, 90.0 - ref_elevation
    d_azimuth = torch.deg2rad(azimuth - ref_azimuth)
    if variant == "stable":
        last = torch.full_like(elevation, math.radians(ref_polar))
    elif variant == "zero123":
        last = distance - ref_distance
    else:
        raise ValueError(f"unknown Zero123 camera variant {variant!r}")
    return torch.stack([torch.deg2rad(polar - ref_polar), torch.sin(d_azimuth), torch.cos(d_azimuth), last], dim=-1)


class Zero123Guidance(RandomStream):
    """The Guidance interface over a Zero123 model (threed/guidance/zero123_model.py) and the run's input
    image (image.*: the image and the reference camera it is seen from). Weights are frozen; fp16 on CUDA
    when guidance.zero123.half_precision, fp32 otherwise."""

    def __init__(self, cfg: Config, device: str) -> None:
        from threed.image import reference_image

        self.cfg = g = cfg.guidance
        self.z = z = g.zero123
        self.image_cfg = cfg.image
        self.device = torch.device(device)
        self.dtype = torch.float16 if (self.device.type == "cuda" and z.half_precision) else torch.float32
        reference = reference_image(cfg.image)  # before any download or load: a bad image should cost no time
        parts = load_zero123(z.model, z.image_encoder, z.config)
        for module in parts.modules():
            module.to(self.device)
            if self.dtype != torch.float32:  # (a cast to float32 would make diffusers warn about nothing)
                module.to(self.dtype)
        self.parts = parts
        self.unet, self.vae = parts.unet, parts.vae
        self.image_encoder, self.projection = parts.image_encoder, parts.projection
        self.alphas_cumprod = parts.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.latent_scale = parts.latent_scale
        in_channels = int(self.unet.config.in_channels)
        latent_channels = int(self.vae.config.latent_channels)
        if in_channels != 2 * latent_channels:
            from threed.errors import UserError

            raise UserError(f"the UNet of '{parts.source}' takes {in_channels} input channels, not 2 x "
                            f"{latent_channels} (noisy and reference latents): it is not a Zero123 model")
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        # The conditions, computed once: the input image over white at the encoder's resolution (threestudio's)
        image = reference.over((1.0, 1.0, 1.0), z.resolution).permute(2, 0, 1)[None].to(self.device)
        self.image_embedding, self.image_latent = self.embed_image(image)

    @torch.no_grad()
    def embed_image(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(1, 3, H, W) in [0, 1] -> (CLIP image embedding (1, 1, D), reference latent (1, C, h, w)): the
        embedding of the image bicubically resized to 224 and CLIP-normalised; the latent, the VAE posterior's
        mode, unscaled (Zero123's c_concat)."""
        x = F.interpolate(image.float(), size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", align_corners=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        embedding = self.image_encoder(pixel_values=((x - mean) / std).to(self.dtype)).image_embeds.float()
        latent = self.vae.encode((image * 2.0 - 1.0).to(self.dtype)).latent_dist.mode().float()
        return embedding[:, None, :], latent

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, H, W, 3) in [0, 1] -> scaled latents (B, C, h, w), differentiable: resized to the encoder's
        resolution (bilinear), the posterior's mean."""
        x = rgb.permute(0, 3, 1, 2).float()
        size = (self.z.resolution, self.z.resolution)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        latents = self.vae.encode((x * 2.0 - 1.0).to(self.dtype)).latent_dist.mean
        return latents.float() * self.latent_scale

    def camera_condition(self, cameras: Cameras) -> Tensor:
        """(B, 4) the training cameras relative to the reference camera (image.*)."""
        ic = self.image_cfg
        return relative_camera(cameras.elevation.float(), cameras.azimuth.float(), cameras.distance.float(),
                               ic.elevation, ic.azimuth, ic.distance, self.z.camera).to(self.device)

    @torch.no_grad()
    def guided_eps(self, latents_noisy: Tensor, t: Tensor, camera: Tensor) -> Tensor:
        """Classifier-free guided epsilon for (B, 4) relative cameras."""
        b = latents_noisy.shape[0]
        token = self.projection(torch.cat([self.image_embedding.expand(b, -1, -1),
                                           camera[:, None, :].to(self.image_embedding.dtype)], dim=-1).to(self.dtype))
        context = torch.cat([torch.zeros_like(token), token])
        reference = self.image_latent.expand(b, -1, -1, -1)
        concat = torch.cat([torch.zeros_like(reference), reference])
        x_in = torch.cat([torch.cat([latents_noisy, latents_noisy]), concat], dim=1).to(self.dtype)
        out = self.unet(x_in, torch.cat([t, t]), encoder_hidden_states=context, return_dict=False)[0].float()
        eps_uncond, eps_cond = out.chunk(2)
        return eps_uncond + self.z.guidance_scale * (eps_cond - eps_uncond)

    def sdedit_space(self, rgb: Tensor, cameras: Cameras, shading: str = "albedo", background: Tensor | None = None):
        """For DreamGaussian's texture refinement (threed/guidance/sdedit.py): the renders' latents, the guided
        eps for the cameras relative to the reference view, the VAE decoder back to (B, H, W, 3) colour in
        [0, 1], and the schedule's alphas_cumprod."""
        from threed.guidance.sdedit import vae_to_rgb

        camera = self.camera_condition(cameras)
        return (self.encode_images(rgb), lambda x, t: self.guided_eps(x, t, camera),
                vae_to_rgb(self.vae, self.latent_scale, self.dtype), self.alphas_cumprod)

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, **_: object) -> dict[str, Tensor]:
        """The SDS loss of a batch of renders seen from `cameras`, with its timestep and gradient norm."""
        batch = rgb.shape[0]
        latents = self.encode_images(rgb)
        t = sds.sample_timesteps(self.cfg, step, batch, self.num_train_timesteps, self.generator)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        abar = self.alphas_cumprod[t]
        latents_noisy = sds.add_noise(latents.detach(), noise, abar)
        eps_hat = self.guided_eps(latents_noisy, t, self.camera_condition(cameras))
        loss, grad = sds.sds_loss(latents, eps_hat, noise, sds.weight(self.cfg.weighting, abar), self.cfg.grad_clip)
        return {"loss": loss, "t": t.float().mean().double() / self.num_train_timesteps, "grad_norm": grad.norm()}
