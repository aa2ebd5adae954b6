"""The settings of image-to-3D's input (the config's `image:` section), apart from threed/image.py so that the
config loads without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from threed.schedule import Schedule


@dataclass
class ImageConfig:
    """The input image of image-to-3D (`threed run --image`, threed/image.py) and the reference camera that sees
    it (threestudio's single-image data: default_elevation_deg, default_azimuth_deg, default_camera_distance,
    default_fovy_deg; degrees and scene units, threed's camera convention, threed/cameras.py)."""

    path: str = ""  # PNG/JPEG/WebP; RGBA as it is, otherwise its background removed (pip install 'threed[image]')
    size: int = 256  # the square it is framed in (pixels)
    border_ratio: float = 0.2  # the object's longer side fills 1 - border_ratio of the square
    recentre: bool = True  # crop to the object and centre it; false: the frame as given, padded to a square
    elevation: float = 5.0
    azimuth: float = 0.0
    distance: float = 3.8
    fovy: float = 20.0
    # The reference view's losses against the image (threestudio's zero123 system, lambda_rgb and lambda_mask):
    # MSE of the colour (the image over the render's background outside its mask) and of the opacity against
    # the mask (alpha > 0.5), the field rendered from the reference camera in albedo each step.
    loss_rgb: Schedule = field(default_factory=lambda: Schedule.constant(0.0))
    loss_mask: Schedule = field(default_factory=lambda: Schedule.constant(0.0))
    # The run's orientation, opacity-entropy and normal-smoothness losses (loss.orient, entropy, normal_smooth,
    # normal_smooth_3d, with their weights) on the reference view's render too, as threestudio's zero123 system
    # computes them in its reference substep as well (sparsity only on the random views).
    regularise: bool = True
    # The reference render's size: (from step, square size) (threestudio's single-image data: height/width
    # with resolution_milestones); empty: the training renders' size.
    sizes: tuple[tuple[int, int], ...] = ()

    def size_at(self, step: int) -> int | None:
        """The reference render's side at `step` (None: the training renders')."""
        current = None
        for start, side in self.sizes:
            if step >= start:
                current = side
        return current

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key, why) range checks, for threed.config.validate."""
        return [(self.size >= 16, "image.size", "must be >= 16"),
                (0.0 <= self.border_ratio < 1.0, "image.border_ratio", "must be in [0, 1)"),
                (self.distance > 0, "image.distance", "must be positive"),
                (0.0 < self.fovy < 180.0, "image.fovy", "must be in (0, 180) degrees"),
                (min(self.loss_rgb.bounds()[0], self.loss_mask.bounds()[0]) >= 0, "image.loss_rgb/loss_mask",
                 "must be >= 0"),
                (all(side > 0 for _, side in self.sizes), "image.sizes", "needs (from step, size > 0) entries")]
