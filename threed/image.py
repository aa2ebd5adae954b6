"""The input image of image-to-3D: read, cut out, centred and scaled as the object the reference view sees.

An RGBA image is taken as it is: its alpha is the object's mask. An image without transparency (a JPEG, an
opaque PNG) needs its background removed first: with the optional extra (`pip install 'threed[image]'`, the
rembg package) that happens here; without it the run stops at once, saying how to get an RGBA image.

Framing follows the image-to-3D preprocessing that Zero-1-to-3 and threestudio's image runs expect: the
object's bounding box (alpha > 0) is cropped, scaled so its longer side fills `1 - border_ratio` of a square of
`size` pixels (0.8 of 256 by default), and centred in it. Every resampling is done on alpha-premultiplied
colour and the colour divided by alpha afterwards: resampling straight colour would blend the (arbitrary,
often black) colour of transparent pixels into the object's edge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threed.errors import UserError, first_line

FORMATS_HINT = "pass a PNG, JPEG or WebP image"
EXTRA_HINT = "pip install 'threed[image]'"
# rembg's default model, fetched by rembg itself on its first use (about 170 MB)
REMBG_MODEL = "u2net"


@dataclass
class ReferenceImage:
    """The object as the reference camera sees it: straight (not premultiplied) colour and alpha, square."""

    rgb: Tensor  # (S, S, 3) float32 in [0, 1], straight colour (undefined where alpha is 0: kept at 0)
    alpha: Tensor  # (S, S) float32 in [0, 1]
    path: str = ""

    @property
    def size(self) -> int:
        return int(self.alpha.shape[0])

    def resized(self, size: int) -> tuple[Tensor, Tensor]:
        """(rgb (size, size, 3), alpha (size, size)) resampled on premultiplied colour (antialiased)."""
        return resample(self.rgb, self.alpha, size)

    def over(self, background: Tensor | tuple[float, float, float], size: int | None = None) -> Tensor:
        """(S, S, 3) colour composited over `background` (a colour, or an image of that size)."""
        rgb, alpha = self.resized(size) if size is not None else (self.rgb, self.alpha)
        bg = torch.as_tensor(background, dtype=rgb.dtype)
        return rgb * alpha[..., None] + bg * (1.0 - alpha[..., None])

    def mask(self, size: int | None = None) -> Tensor:
        """The object's mask as threestudio's single-image data has it: alpha > 0.5 (float, (S, S))."""
        alpha = self.resized(size)[1] if size is not None else self.alpha
        return (alpha > 0.5).float()


def resample(rgb: Tensor, alpha: Tensor, size: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Straight colour and alpha resampled to `size` (an int: square) through premultiplied colour, so that
    transparent pixels' colour never leaks into the edge; bilinear with antialiasing (area-like when shrinking)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(alpha.shape) == hw:
        return rgb, alpha
    pre = torch.cat([rgb * alpha[..., None], alpha[..., None]], dim=-1).permute(2, 0, 1)[None]
    out = F.interpolate(pre, size=hw, mode="bilinear", align_corners=False, antialias=True)[0].permute(1, 2, 0)
    a = out[..., 3].clamp(0.0, 1.0)
    covered = a[..., None] > 1e-6
    straight = torch.where(covered, out[..., :3] / a[..., None].clamp_min(1e-6), torch.zeros_like(out[..., :3]))
    return straight.clamp(0.0, 1.0), a


def _open(path: Path):
    """The image file as a loaded PIL image; one-line errors for a missing, empty or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UserError(f"image '{path}' not found: {FORMATS_HINT} to --image")
    if path.is_dir():
        raise UserError(f"image '{path}' is a folder: {FORMATS_HINT} to --image")
    if path.stat().st_size == 0:
        raise UserError(f"image '{path}' is empty (0 bytes): {FORMATS_HINT}")
    try:
        image = Image.open(path)
        image.load()  # decodes now: a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image '{path}' ({first_line(e)}): {FORMATS_HINT}") from None
    if image.width < 2 or image.height < 2:
        raise UserError(f"image '{path}' is {image.width}x{image.height} pixels: pass a larger image")
    return image


def has_transparency(image) -> bool:
    """Whether a PIL image carries an alpha channel (or a transparent palette entry) that is not all opaque."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        return bool((alpha < 255).any())
    return False


def remove_background(image, path: Path):
    """The image with its background removed by rembg (the optional extra), as an RGBA PIL image."""
    try:
        import rembg
    except ImportError:
        raise UserError(f"image '{path}' has no transparent background: pass an RGBA PNG with the object cut out, "
                        f"or install background removal with `{EXTRA_HINT}`") from None
    try:
        session = rembg.new_session(REMBG_MODEL)
        out = rembg.remove(image.convert("RGB"), session=session)
    except Exception as e:  # rembg's download and onnxruntime raise many types
        raise UserError(f"removing the background of '{path}' failed ({first_line(e)}): rembg downloads its "
                        f"{REMBG_MODEL} model on first use, which needs internet once; or pass an RGBA PNG with the "
                        f"object cut out") from None
    if not hasattr(out, "convert"):  # bytes or an array, depending on rembg's input type
        from PIL import Image

        out = Image.fromarray(np.asarray(out))
    return out.convert("RGBA")


def recentre(rgb: Tensor, alpha: Tensor, size: int, border_ratio: float) -> tuple[Tensor, Tensor]:
    """The object's bounding box (alpha > 0) scaled so that its longer side is `(1 - border_ratio) * size`
    pixels and centred in a `size`-pixel square (transparent elsewhere)."""
    ys, xs = torch.nonzero(alpha > 0, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = y1 - y0, x1 - x0
    desired = max(int(round(size * (1.0 - border_ratio))), 1)
    scale = desired / max(h, w)
    nh, nw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
    crop_rgb, crop_a = resample(rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1], (nh, nw))
    out_rgb = torch.zeros(size, size, 3)
    out_a = torch.zeros(size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out_rgb[top:top + nh, left:left + nw] = crop_rgb
    out_a[top:top + nh, left:left + nw] = crop_a
    return out_rgb, out_a


def load_image(path: str | os.PathLike, size: int = 256, border_ratio: float = 0.2,
               recentre_object: bool = True) -> ReferenceImage:
    """The input image at `size`² with the object centred and scaled (see the module docstring). An image
    without transparency goes through background removal (the optional extra) or stops with one line."""
    p = Path(path).expanduser()
    image = _open(p)
    if not has_transparency(image):
        image = remove_background(image, p)
    rgba = torch.from_numpy(np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0)
    rgb, alpha = rgba[..., :3].contiguous(), rgba[..., 3].contiguous()
    if not bool((alpha > 0).any()):
        raise UserError(f"image '{p}' is fully transparent: there is no object to reconstruct")
    if recentre_object:
        rgb, alpha = recentre(rgb, alpha, size, border_ratio)
    else:  # padded to a square (transparent), then resampled
        h, w = alpha.shape
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        rgb = F.pad(rgb.permute(2, 0, 1), (left, side - w - left, top, side - h - top)).permute(1, 2, 0)
        alpha = F.pad(alpha, (left, side - w - left, top, side - h - top))
        rgb, alpha = resample(rgb, alpha, size)
    return ReferenceImage(rgb * (alpha[..., None] > 0), alpha, str(p))


_CACHE: dict[tuple, ReferenceImage] = {}


def reference_image(cfg) -> ReferenceImage:
    """The run's input image (cfg: the config's `image` section), loaded once per process and settings:
    the run's checks, its guidance and its losses share one background removal."""
    p = Path(cfg.path).expanduser()
    stamp = p.stat().st_mtime_ns if p.is_file() else None
    key = (str(p.resolve()) if p.exists() else str(p), stamp, cfg.size, cfg.border_ratio, cfg.recentre)
    if key not in _CACHE:
        _CACHE.clear()  # one image per run; never hold onto an earlier one
        _CACHE[key] = load_image(p, cfg.size, cfg.border_ratio, cfg.recentre)
    return _CACHE[key]
