"""Image-to-3D's scenes: DreamFusion's NeRF (zero123), Magic3D's mesh after it (zero123-mesh) or DreamGaussian's
Gaussians (dreamgaussian-image), also seen from the reference camera and held to the input image.

Each training step the prior scores random views (the trainer's loop, unchanged); the scene's regularisers add
what threestudio's zero123 system computes in its reference-view substep: the field rendered from the
reference camera (image.elevation, azimuth, distance, fovy) in albedo over the background, and

    rgb  = mean |render - (image * mask + background * (1 - mask))|^2     (image.loss_rgb)
    mask = mean |opacity - mask|^2,  mask = alpha > 0.5                    (image.loss_mask)

and, with image.regularise, the run's orientation, opacity-entropy and normal-smoothness terms of that render
(ref_orient, ref_entropy, ref_normal_smooth, ref_normal_smooth_3d), weighted as the random views' (loss.*):
threestudio's reference substep computes them too, all but sparsity. DreamGaussian's image run adds the two
losses to its Gaussian stage, the reference view rendered over the white background (its fixed camera's) while the
random views take white or black at random; its texture stage (ReferenceViewTextureScene) pulls the texture toward the
image where the fixed surface faces the reference camera.

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
from threed.schedule import Schedule
from threed.scenes import weight_used
from threed.scenes.gaussians import GaussianScene
from threed.scenes.mesh import MeshScene
from threed.scenes.nerf import NeRFScene


# The random views' regularisers that the reference view's render gets too (threestudio's reference substep)
REFERENCE_REGULARISERS = ("orient", "entropy", "normal_smooth", "normal_smooth_3d")


class ReferenceLosses:
    """The run's loss weights (cfg.loss) and the reference view's (image.loss_rgb as `rgb`, image.loss_mask as
    `mask`, and ref_<name> the weight of loss.<name> for each of REFERENCE_REGULARISERS, zero without
    image.regularise), as one set of schedules for the trainer."""

    def __init__(self, loss: Any, image: Any) -> None:
        self._loss = loss
        self.rgb, self.mask = image.loss_rgb, image.loss_mask
        self._regularise = image.regularise

    def __getattr__(self, name: str) -> Any:
        if name.startswith("ref_") and name[4:] in REFERENCE_REGULARISERS:
            return getattr(self._loss, name[4:]) if self._regularise else Schedule.constant(0.0)
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
    """The reference camera's view of a scene (a NeRF, or Magic3D's mesh stage after it): the input image, the
    render from the reference camera, the preview's first row and the closing record's scores."""

    cfg: Config
    device: torch.device

    @property
    def reference(self) -> ReferenceImage:
        """The input image, read when first needed: a run's export needs it only for the preview's first row
        and the closing record, so an image moved away since training does not stop an export."""
        return reference_image(self.cfg.image)

    def reference_size(self, step: int) -> int:
        return self.cfg.image.size_at(step) or self.cfg.render.size(step)[1]

    def render_reference(self, size: int, need_normals: bool = False) -> RenderOutput:
        return self.render(reference_camera(self.cfg.image, size).to(self.device), "albedo",  # type: ignore[attr-defined]
                           need_normals)

    def reference_terms(self, step: int) -> dict[str, Tensor]:
        """The rgb and mask losses of this step's reference render (none when both weights are zero)."""
        if not (weight_used(self.losses, "rgb") or weight_used(self.losses, "mask")):  # type: ignore[attr-defined]
            return {}
        return reference_losses(self.render_reference(self.reference_size(step)), self.reference)

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


class ReferenceViewNeRFScene(ReferenceView, NeRFScene):
    """NeRFScene with the input image's reference-view losses (see the module docstring)."""

    def __init__(self, cfg: Config, device: torch.device | str):
        super().__init__(cfg, device)
        self.losses = ReferenceLosses(cfg.loss, cfg.image)

    def wants_normal_terms(self) -> bool:
        return super().wants_normal_terms() or any(
            weight_used(self.losses, f"ref_{name}") for name in ("normal_smooth", "normal_smooth_3d"))

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        result = super().regularisers(out, step)
        own = [name for name in REFERENCE_REGULARISERS if weight_used(self.losses, f"ref_{name}")]
        if weight_used(self.losses, "rgb") or weight_used(self.losses, "mask") or own:
            ref = self.render_reference(self.reference_size(step), need_normals=weight_used(self.losses, "ref_orient"))
            result.update(reference_losses(ref, self.reference))
            terms = NeRFScene.regularisers(self, ref, step)  # the random views' terms, of the reference render
            result.update({f"ref_{name}": terms[name] for name in own if name in terms})
        return result


class ReferenceViewMeshScene(ReferenceView, MeshScene):
    """Magic3D's mesh stage after image-to-3D's NeRF: the mesh scene with the reference view's RGB and mask
    losses kept (image.loss_rgb, image.loss_mask), its surface rasterized from the reference camera in albedo each
    step. The NeRF's orientation, opacity and normal-smoothness terms do not apply to a mesh (threestudio's zero123
    system in refinement keeps the reference substep's RGB and mask losses and adds the mesh's own smoothness,
    systems/zero123.py:182-193): the mesh stage's own regularisers (mesh.loss) act instead."""

    def __init__(self, cfg: Config, geometry: Any, texture: Any, background: Any, device: torch.device | str):
        super().__init__(cfg, geometry, texture, background, device)
        self.losses = ReferenceLosses(cfg.mesh.loss, cfg.image)

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        result = super().regularisers(out, step)  # the surface of the random views' render
        result.update(self.reference_terms(step))
        return result


def texture_reference_loss(out: RenderOutput, cameras: Cameras, reference: ReferenceImage) -> Tensor:
    """DreamGaussian's texture-stage term (main2.py, "known view"): mean |render - image over white|^2 over the
    reference render `out` (batch of 1, with its normal map), counting only pixels where the surface is seen
    with a view cosine above 0.5 (zero elsewhere, averaged over all pixels as its mse_loss of masked images).
    The cosine is DreamGaussian's: the normal's component along the camera's backward axis (camera-space z)."""
    size = out.rgb.shape[1]
    target = reference.over((1.0, 1.0, 1.0), size).to(out.rgb.device)
    seen = out.normal[0].sum(-1, keepdim=True) > 0  # the normal map is zero exactly where no face is hit
    facing = ((out.normal[0] * 2.0 - 1.0) * cameras.c2w[0, :3, 2].to(out.normal)).sum(-1, keepdim=True)
    valid = (seen & (facing > 0.5)).to(out.rgb.dtype).detach()
    return ((out.rgb[0] - target) * valid).square().mean()


class ReferenceViewTextureScene(ReferenceView, MeshScene):
    """The texture stage of DreamGaussian's image run (dreamgaussian-image): the surface fixed, the random views
    under the prior's edits, and the texture also pulled toward the input image from the reference camera where
    the surface faces it (mesh.loss.reference, `texture_reference_loss`). No mask loss: the surface is fixed."""

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        result = super().regularisers(out, step)
        if weight_used(self.losses, "reference"):
            cameras = reference_camera(self.cfg.image, self.reference_size(step)).to(self.device)
            ref = self.render(cameras, "albedo", need_normals=True)
            result["reference"] = texture_reference_loss(ref, cameras, self.reference)
        return result


class ReferenceViewGaussianScene(ReferenceView, GaussianScene):
    """GaussianScene with the input image's RGB and mask losses (dreamgaussian-image). The reference view is
    rendered over the background's fixed colour (white, as DreamGaussian's fixed camera), and the densification
    statistics stay those of the random view, as DreamGaussian's are (it renders the reference view first)."""

    def __init__(self, cfg: Config, device: torch.device | str, *args: Any, **kwargs: Any):
        super().__init__(cfg, device, *args, **kwargs)
        self.losses = ReferenceLosses(cfg.loss, cfg.image)

    def render_reference(self, size: int, need_normals: bool = False) -> RenderOutput:
        views, was_training = self._views, self.background.training
        self.background.eval()
        try:
            return self.render(reference_camera(self.cfg.image, size).to(self.device), "albedo")
        finally:
            self.background.train(was_training)
            self._views = views

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        result = super().regularisers(out, step)
        result.update(self.reference_terms(step))
        return result
