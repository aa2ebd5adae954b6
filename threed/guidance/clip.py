"""CLIP guidance (Dream Fields, PureCLIPNeRF): pull augmented renders towards the prompt's CLIP embedding.

    loss = -mean_{models, augs, images} cos(E_img(aug(render)), E_txt(prompt))   [+ w * cos(.., negative)]

CLIP alone happily scores a texture painted on a flat background or on the image border, so every
image is augmented before it is embedded, as Dream Fields does (its augment.py): a square crop at a random
position (guidance.clip.crop_scale of the render's side, Dream Fields' 80/88) resampled to CLIP's input
size, then recomposited by its opacity over a random background drawn at that size: uniform noise, a
checkerboard of 8 x 8 squares in two random colours, or a random smooth Fourier image, a third each, then
blurred with a Gaussian of std drawn in [0, 10] px. The background is then useless for the score and the
object has to carry the semantics. The transmittance (sparsity) regulariser that keeps the scene from
filling space is applied by the trainer from cfg.loss.transmittance*.
"""

from __future__ import annotations

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

# Dream Fields' background augmentation (config_base.py: noise_bg_prob, checker_bg_prob, fft_bg_prob,
# checker_bg_nsq, bg_blur_std_range; augment.py: random_bg, its blur's kernel_size 15).
BACKGROUNDS = ("noise", "checkerboard", "fourier")
BACKGROUND_PROBS = (0.333, 0.333, 0.334)
CHECKER_SQUARES = 8
BLUR_STD = (0.0, 10.0)  # px, uniform
BLUR_KERNEL = 15  # px: the blur is cut to a 15-tap kernel (radius 7) whatever its std
# The Fourier image (Dream Fields' optvis.py, from lucid): Gaussian spectrum of std 0.2 scaled by
# 1 / frequency^1.5, mapped through ImageNet's colour correlation and a sigmoid.
FOURIER_SD = 0.2
FOURIER_DECAY = 1.5
COLOUR_CORRELATION_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


def checkerboard(size: int, colours: Tensor, squares: int = CHECKER_SQUARES) -> Tensor:
    """(B, size, size, 3) from colours (B, 2, 3): `squares` x `squares` squares, colours[:, 0] where row +
    column of the square is even, colours[:, 1] where odd (a size that `squares` does not divide gets the
    remainder in its last squares)."""
    cell = torch.arange(size, device=colours.device) * squares // size
    parity = (cell[:, None] + cell[None, :]) % 2  # (size, size)
    return colours[:, parity]


def fourier_raw(spectrum: Tensor) -> Tensor:
    """(B, size, size, 3) before the colour mapping, from a random spectrum (B, 2, 3, size, size // 2 + 1 +
    size % 2) of standard normals (real and imaginary parts): scaled by FOURIER_SD / max(f, 1 / size)^FOURIER_DECAY
    and by sqrt(size^2), inverse-FFT'd, divided by 4."""
    size = spectrum.shape[-2]
    fy = torch.fft.fftfreq(size, device=spectrum.device)[:, None]
    fx = torch.fft.fftfreq(size, device=spectrum.device)[: spectrum.shape[-1]]  # an odd size keeps one more
    freqs = (fx * fx + fy * fy).sqrt()
    scale = FOURIER_SD * size / freqs.clamp_min(1.0 / size) ** FOURIER_DECAY
    img = torch.fft.irfft2(torch.complex(spectrum[:, 0], spectrum[:, 1]) * scale)[..., :size, :size]  # cut off
    return img.permute(0, 2, 3, 1) / 4.0


def fourier_spectrum_shape(size: int) -> tuple[int, int, int, int]:
    """The shape of one image's random spectrum for fourier_raw."""
    return 2, 3, size, size // 2 + 1 + size % 2


def fourier_image(spectrum: Tensor) -> Tensor:
    """(B, size, size, 3) in (0, 1): smooth random images with natural-image colours (fourier_raw, decorrelated
    colours mapped to RGB by the square root of ImageNet's colour correlation, then a sigmoid)."""
    corr = torch.tensor(COLOUR_CORRELATION_SQRT, device=spectrum.device)
    corr = corr / corr.norm(dim=0).max()
    return torch.sigmoid(fourier_raw(spectrum) @ corr.T)


def blur(x: Tensor, sigma: Tensor, kernel: int = BLUR_KERNEL) -> Tensor:
    """Separable Gaussian blur of each image of (B, C, H, W) with its std sigma[b] px over `kernel` taps
    (rounded down to odd) and zeros beyond the border, as Dream Fields' blur (dm_pix.gaussian_blur, SAME
    padding): a wide blur darkens the outer kernel // 2 pixels. A std of 0 leaves its image as it is."""
    b, c, h, w = x.shape
    radius = kernel // 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(x.device, x.dtype)[:, None]
    k = torch.where(sigma > 1e-6, torch.exp(-0.5 * (t / sigma.clamp_min(1e-6)) ** 2), (t == 0).to(x.dtype))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B * C, taps)
    x = x.reshape(1, b * c, h, w)
    x = F.conv2d(x, k[:, None, None, :], padding=(0, radius), groups=b * c)
    x = F.conv2d(x, k[:, None, :, None], padding=(radius, 0), groups=b * c)
    return x.view(b, c, h, w)


def draw_backgrounds(n: int, generator: torch.Generator) -> tuple[list[str], Tensor]:
    """The kinds (BACKGROUNDS, with BACKGROUND_PROBS) and blur stds (n,) (uniform in BLUR_STD) of n backgrounds."""
    kinds = torch.multinomial(torch.tensor(BACKGROUND_PROBS), n, replacement=True, generator=generator).tolist()
    stds = BLUR_STD[0] + torch.rand(n, generator=generator) * (BLUR_STD[1] - BLUR_STD[0])
    return [BACKGROUNDS[k] for k in kinds], stds


def unblurred_backgrounds(kinds: list[str], size: int, generator: torch.Generator,
                          device: torch.device | str = "cpu") -> Tensor:
    """(len(kinds), size, size, 3) in [0, 1], one of each kind, unblurred. The random numbers come from the
    CPU `generator`; the images are made on `device`."""
    out = torch.empty(len(kinds), size, size, 3, device=device)
    for kind in BACKGROUNDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        if kind == "noise":
            made = torch.rand(len(idx), size, size, 3, generator=generator).to(device)
        elif kind == "checkerboard":
            made = checkerboard(size, torch.rand(len(idx), 2, 3, generator=generator).to(device))
        else:
            spectrum = torch.randn(len(idx), *fourier_spectrum_shape(size), generator=generator).to(device)
            made = fourier_image(spectrum)
        out[torch.tensor(idx, device=device)] = made
    return out


def random_backgrounds(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """(n, size, size, 3) Dream Fields backgrounds on `device` (`generator` is a CPU one)."""
    kinds, stds = draw_backgrounds(n, generator)
    images = unblurred_backgrounds(kinds, size, generator, device)
    return blur(images.permute(0, 3, 1, 2), stds).permute(0, 2, 3, 1)


def random_resized_crop(images: Tensor, size: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Differentiable square crops of side `s` * image side (s ~ U[scale]) at random positions (uniform over
    every position inside the image), resampled bilinearly to `size` x `size`. (B, H, W, C) -> (B, size, size, C)."""
    b, c = images.shape[0], images.shape[-1]
    s = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    # in grid_sample's [-1, 1] coordinates a crop of relative side s can be centred within +-(1 - s)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - s)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = s, s, tx, ty
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    x = F.grid_sample(images.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x.permute(0, 2, 3, 1)


class ClipGuidance(RandomStream):
    """An ensemble of frozen CLIP models scoring augmented renders against the prompt (Guidance interface).
    It reads the run config's guidance section (guidance.clip), prompts, cameras and seed."""

    negative_weight: float = 0.5  # of the similarity to the negative prompt, where one is given

    def __init__(self, cfg: Config, device: str | torch.device) -> None:
        g = self.cfg = cfg.guidance
        prompt, negative_prompt = cfg.prompt, cfg.negative_prompt
        self.camera_cfg = cfg.camera
        self.device = torch.device(device)
        self.num_augs = max(1, g.clip.num_augs)
        self.crop_scale: tuple[float, float] = tuple(g.clip.crop_scale)  # type: ignore[assignment]
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
        size = self.cfg.clip.resolution
        if opacity is None or background is None:
            return random_resized_crop(x, size, self.crop_scale, self.generator)
        alpha = opacity.repeat_interleave(self.num_augs, dim=0)
        old_bg = background.detach().repeat_interleave(self.num_augs, dim=0)
        # rgb = premultiplied foreground + (1 - alpha) * old background: taking the old background out is exact
        # and keeps gradients to both colour and opacity. The foreground and its opacity are cropped together,
        # then laid over a background drawn at CLIP's size, as Dream Fields does.
        fg = x - (1.0 - alpha) * old_bg
        crops = random_resized_crop(torch.cat([fg, alpha], dim=-1), size, self.crop_scale, self.generator)
        fg, alpha = crops[..., :3], crops[..., 3:]
        new_bg = random_backgrounds(x.shape[0], size, self.generator, x.device).to(x.dtype)
        return fg + (1.0 - alpha) * new_bg

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
