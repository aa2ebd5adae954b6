"""CLIP guidance (Dream Fields, PureCLIPNeRF): pull augmented renders towards the prompt's CLIP embedding.

    loss = -mean_{models, augs, images} cos(E_img(aug(render)), E_txt(prompt))   [+ w * cos(.., negative)]

CLIP alone happily scores a texture painted on a flat background or on the image border, so every
image is augmented before it is embedded (Dream Fields): the render is recomposited over a random
background (noise, checkerboard or blurred noise) using its opacity, which makes the background
useless for the score and forces the object to carry the semantics, then a random resized crop is
taken and resampled to CLIP's input size. The transmittance (sparsity) regulariser that keeps the
scene from filling space is applied by the trainer from cfg.loss.transmittance*.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from threed.cameras import VIEWS, Cameras, view_names
from threed.clip_models import encode_texts, load_clip, preprocess
from threed.guidance import RandomStream
from threed.prompts import view_prompt

if TYPE_CHECKING:
    from threed.config import Config

BACKGROUNDS = ("noise", "checkerboard", "blurred")


def random_backgrounds(n: int, h: int, w: int, generator: torch.Generator) -> Tensor:
    """(n, H, W, 3) backgrounds on the CPU (`generator` is a CPU one), each one of: uniform noise, a
    checkerboard of two random colours, or noise blurred with a Gaussian of random width (colour blobs)."""
    kinds = torch.randint(len(BACKGROUNDS), (n,), generator=generator).tolist()
    out = []
    for kind in kinds:
        if BACKGROUNDS[kind] == "noise":
            bg = torch.rand(h, w, 3, generator=generator)
        elif BACKGROUNDS[kind] == "checkerboard":
            tile = int(torch.randint(max(2, min(h, w) // 16), max(3, min(h, w) // 3), (1,), generator=generator))
            colours = torch.rand(2, 3, generator=generator)
            yy = torch.arange(h)[:, None] // tile
            xx = torch.arange(w)[None, :] // tile
            bg = colours[((yy + xx) % 2)]
        else:
            sigma = float(torch.empty(1).uniform_(1.0, max(1.5, min(h, w) / 12), generator=generator))
            bg = gaussian_blur(torch.rand(1, 3, h, w, generator=generator), sigma)[0].permute(1, 2, 0)
            # blurring shrinks the noise towards 0.5: stretch it back to a visible contrast
            lo, hi = bg.amin(dim=(0, 1)), bg.amax(dim=(0, 1))
            bg = (bg - lo) / (hi - lo).clamp_min(1e-6)
        out.append(bg)
    return torch.stack(out)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    radius = max(1, min(int(math.ceil(3 * sigma)), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def random_resized_crop(images: Tensor, size: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Differentiable square crops of side `s` * image side (s ~ U[scale]) at random positions,
    resampled to `size` x `size`. (B, H, W, 3) -> (B, size, size, 3)."""
    b = images.shape[0]
    s = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    # in grid_sample's [-1, 1] coordinates a crop of relative side s can be centred within +-(1 - s)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(images.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x.permute(0, 2, 3, 1)


class ClipGuidance(RandomStream):
    """An ensemble of frozen CLIP models scoring augmented renders against the prompt (Guidance interface).
    It reads the run config's guidance section (guidance.clip), prompts, cameras and seed."""

    crop_scale: tuple[float, float] = (0.7, 1.0)
    negative_weight: float = 0.5  # of the similarity to the negative prompt, where one is given

    def __init__(self, cfg: Config, device: str | torch.device) -> None:
        g = self.cfg = cfg.guidance
        prompt, negative_prompt = cfg.prompt, cfg.negative_prompt
        self.camera_cfg = cfg.camera
        self.device = torch.device(device)
        self.num_augs = max(1, g.clip.num_augs)
        self.negative_weight = self.negative_weight if negative_prompt else 0.0
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        # View-dependent prompts (DreamFusion): one text per view name, picked per camera.
        self.texts = {v: view_prompt(prompt, v) if g.view_dependent_prompting else prompt for v in VIEWS}
        self.models = []
        for name, pretrained in zip(g.clip.models, g.clip.pretrained):
            model, mean_std, tokenizer = load_clip(name, pretrained, self.device, image_size=g.clip.resolution)
            text = encode_texts(model, tokenizer, [self.texts[v] for v in VIEWS])  # (len(VIEWS), D)
            negative = encode_texts(model, tokenizer, [negative_prompt]) if negative_prompt else None
            self.models.append((model, mean_std, text, negative))

    def augment(self, rgb: Tensor, background: Tensor | None, opacity: Tensor | None) -> Tensor:
        """(B, H, W, 3) -> (B * num_augs, S, S, 3) with S = clip_resolution, image-major order."""
        x = rgb.repeat_interleave(self.num_augs, dim=0)
        if opacity is not None and background is not None:
            b, h, w, _ = x.shape
            alpha = opacity.repeat_interleave(self.num_augs, dim=0)
            old_bg = background.detach().repeat_interleave(self.num_augs, dim=0)
            # rgb = premultiplied foreground + (1 - alpha) * old background, so swapping the background
            # is exact and keeps gradients to both colour and opacity.
            new_bg = random_backgrounds(b, h, w, self.generator).to(x.device, x.dtype)
            x = x + (1.0 - alpha) * (new_bg - old_bg)
        return random_resized_crop(x, self.cfg.clip.resolution, self.crop_scale, self.generator)

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, shading: str, background: Tensor | None = None,
                 opacity: Tensor | None = None, **kwargs) -> dict[str, Tensor | float]:
        views = [VIEWS.index(v) for v in view_names(cameras, self.camera_cfg)]
        view_idx = torch.tensor(views, device=self.device).repeat_interleave(self.num_augs)
        total = rgb.new_zeros(())
        sims = []
        for model, mean_std, text, negative in self.models:
            images = self.augment(rgb, background, opacity)
            emb = F.normalize(model.encode_image(preprocess(images, mean_std, self.cfg.clip.resolution)).float(), dim=-1)
            sim = (emb * text[view_idx]).sum(-1)
            loss = -sim.mean()
            if negative is not None:
                loss = loss + self.negative_weight * (emb @ negative[0]).mean()
            total = total + loss
            sims.append(sim.detach().mean())
        return {"loss": total / len(self.models), "clip_sim": float(torch.stack(sims).mean())}
