"""Image-to-3D's scenes: DreamFusion's NeRF (zero123) or DreamGaussian's Gaussians, also seen from the reference
camera and held to the input image.

Each training step the prior scores random views (the trainer's loop, unchanged); the scene's regularisers add
what threestudio's zero123 system computes in its reference-view substep: the field rendered from the
reference camera (image.elevation, azimuth, distance, fovy) in albedo over the background, and

    rgb  = mean |render - (image * mask + background * (1 - mask))|^2     (image.loss_rgb)
    mask = mean |opacity - mask|^2,  mask = alpha > 0.5                    (image.loss_mask)

DreamGaussian's image run (dreamgaussian-image) adds the same two losses to its Gaussian stage, the reference view
rendered over the white background (its fixed camera's) while the random views take random backgrounds.

The input image was framed for that camera (threed/image.py: centred, its longer side 0.8 of the frame), so
the object it shows is reconstructed around the origin at the size the camera's field of view gives it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from threed.cameras import Cameras, make_cameras
from threed.config import Config
from threed.image import ReferenceImage, reference_image
from threed.render.volume import RenderOutput
from threed.scenes import weight_used
from threed.scenes.gaussians import GaussianScene
from threed.scenes.nerf import NeRFScene


class ReferenceLosses:
    """The run's loss weights (cfg.loss) and the reference view's (image.loss_rgb as `rgb`, image.loss_mask as
    `mask`), as one set of schedules for the trainer."""

    def __init__(self, loss: Any, image: Any) -> None:
        self._loss = loss
        self.rgb, self.mask = image.loss_rgb, image.loss_mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loss, name)


def reference_camera(image_cfg: Any, size: int) -> Cameras:
    """The camera the input image is seen from (image.*), rendering `size` x `size`; the light at the camera."""
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(image_cfg.elevation), one(image_cfg.azimuth), one(image_cfg.distance),
                        one(image_cfg.fovy), size, size)


def reference_losses(out: RenderOutput, reference: ReferenceImage) -> dict[str, Tensor]:
    """rgb and mask losses of a reference-camera render `out` (batch of 1) against the input image."""
    size = out.rgb.shape[1]
    rgb, alpha = reference.resized(size)
    mask = (alpha > 0.5).float().to(out.rgb.device)[..., None]
    target = rgb.to(out.rgb.device) * mask + out.background[0].detach() * (1.0 - mask)
    return {"rgb": (out.rgb[0] - target).square().mean(), "mask": (out.opacity[0] - mask).square().mean()}


class ReferenceView:
    """The input image's reference view and its losses, added to a scene class (see the module docstring):
    `class S(ReferenceView, SomeScene)`, SomeScene taking (cfg, device, ...)."""

    cfg: Config
    device: torch.device

    def __init__(self, cfg: Config, device: torch.device | str, *args: Any, **kwargs: Any):
        super().__init__(cfg, device, *args, **kwargs)  # type: ignore[call-arg]
        self.losses = ReferenceLosses(cfg.loss, cfg.image)

    @property
    def reference(self) -> ReferenceImage:
        """The input image, read when first needed: a run's export needs it only for the preview's first row
        and the closing record, so an image moved away since training does not stop an export."""
        return reference_image(self.cfg.image)

    def reference_size(self, step: int) -> int:
        return self.cfg.image.size_at(step) or self.cfg.render.size(step)[1]

    def render_reference(self, size: int) -> RenderOutput:
        return self.render(reference_camera(self.cfg.image, size).to(self.device), "albedo")

    @torch.no_grad()
    def reference_pair(self, size: int) -> list[np.ndarray]:
        """[the input image over the background, the render from the reference camera] (uint8 (size, size, 3)):
        the preview's first row."""
        out = self.render_reference(size)
        shown = self.reference.over(out.background[0].cpu().float(), size)
        to_bytes = lambda x: (x.clamp(0, 1) * 255).round().byte().cpu().numpy()  # noqa: E731
        return [to_bytes(shown), to_bytes(out.rgb[0])]

    @torch.no_grad()
    def reference_metrics(self) -> dict[str, float]:
        """How the reference view reproduces the input image, at the image's size: PSNR and SSIM of the
        colour (the image over the render's background) and the IoU of opacity and alpha (each > 0.5);
        threed/image_metrics.py. For a run's closing record."""
        from threed.image_metrics import mask_iou, psnr, ssim

        size = self.reference.size
        out = self.render_reference(size)
        render = out.rgb[0].clamp(0, 1).cpu()
        target = self.reference.over(out.background[0].cpu().float())
        return {"reference_psnr": round(psnr(render, target), 3), "reference_ssim": round(ssim(render, target), 4),
                "reference_mask_iou": round(mask_iou(out.opacity[0, ..., 0].cpu(), self.reference.alpha), 4)}

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        result = super().regularisers(out, step)  # type: ignore[misc]
        if weight_used(self.losses, "rgb") or weight_used(self.losses, "mask"):
            result.update(reference_losses(self.render_reference(self.reference_size(step)), self.reference))
        return result


class ReferenceViewNeRFScene(ReferenceView, NeRFScene):
    """NeRFScene with the input image's reference-view losses (zero123)."""


class ReferenceViewGaussianScene(ReferenceView, GaussianScene):
    """GaussianScene with the input image's reference-view losses (dreamgaussian-image). The reference view is
    rendered over the background's fixed colour (white, as DreamGaussian's fixed camera), and the densification
    statistics stay those of the random view, as DreamGaussian's are (it renders the reference view first)."""

    def render_reference(self, size: int) -> RenderOutput:
        views, was_training = self._views, self.background.training
        self.background.eval()
        try:
            return self.render(reference_camera(self.cfg.image, size).to(self.device), "albedo")
        finally:
            self.background.train(was_training)
            self._views = views
