"""The settings sections of the field, renderer, cameras, optimiser, losses and export:
plain dataclasses, filled and checked by threed/config.py (which re-exports them), importing nothing of
threed but the schedule type, so any module can read them without pulling in the config's machinery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from threed.schedule import Schedule, render_size


@dataclass
class FieldConfig:
    """Hash-grid NeRF: density + albedo (see threed/fields/)."""

    backend: Literal["auto", "torch", "triton", "tcnn"] = "auto"  # auto: tcnn, else triton on CUDA, else torch
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    # shared: one MLP with four outputs (density, albedo); separate: threestudio's implicit-volume, a density MLP
    # and an albedo MLP on the same features, each n_hidden_layers of hidden_dim, bias-free (threed/fields/nerf.py)
    heads: Literal["shared", "separate"] = "shared"
    density_activation: Literal["trunc_exp", "softplus"] = "softplus"
    density_blob_scale: float = 10.0  # Magic3D blob: raw density += scale * (1 - |x| / std)
    density_blob_std: float = 0.5
    normals: Literal["finite_difference", "analytic"] = "finite_difference"
    finite_difference_eps: float = 0.01
    # Coarse-to-fine levels (threestudio's ProgressiveBandHashGrid): (start_level, start_step, update_steps), only
    # the first start_level levels' features reach the MLP, one more from start_step on every update_steps steps;
    # the others are zero. Empty: every level from step 0.
    progressive_levels: tuple[int, ...] = ()


@dataclass
class RenderConfig:
    """Volume rendering, shading and background (see threed/render/)."""

    backend: Literal["auto", "torch", "nerfacc"] = "auto"
    width: int = 64
    height: int = 64
    batch_size: int = 1
    num_samples: int = 64  # samples per ray across the bounding box (nerfacc: step = diagonal / this)
    bound: float = 1.0  # the scene is the cube [-bound, bound]^3
    occupancy_resolution: int = 64
    occupancy_update_every: int = 16
    occupancy_threshold: float = 0.01
    # Samples in occupied cells whose alpha (1 - exp(-density x step)) is below this (or below the occupancy
    # grid's mean value, if smaller, as nerfacc takes it) are dropped before the field is evaluated with
    # gradients (threestudio's prune_alpha_threshold: 0.01); 0 keeps every sample in an occupied cell.
    alpha_threshold: float = 0.0
    # random: DreamFusion's choice per step; normal: the prior scores normal maps ((n + 1) / 2, world space)
    shading: Literal["random", "albedo", "lambertian", "textureless", "normal"] = "random"
    albedo_only_steps: int = 1000  # DreamFusion: albedo only while the coarse shape forms
    textureless_prob: float = 0.5
    # After the warm-up, the chance of a plain albedo render (threestudio: 1 - diffuse_prob = 0.25); the rest
    # splits into textureless (textureless_prob) and lambertian.
    albedo_prob: float = 0.0
    ambient: float = 0.1
    # Magic3D's soft shading in this (the NeRF) stage: each lit training render splits its light between ambient
    # and diffuse at random (ambient ~ U[0, 1)) instead of `ambient`'s fixed split. Mesh stages: mesh.soft_shading.
    soft_shading: bool = False
    # The point light's distance: a multiple of the camera's distance, or, with light_distance_absolute, scene
    # units from the origin (threestudio's light_distance_range, [0.8, 1.5] by default).
    light_distance: tuple[float, float] = (0.8, 1.5)
    light_distance_absolute: bool = False
    # The point light's direction (threestudio's light_sample_strategy): dreamfusion, the camera's direction
    # perturbed by Gaussian noise of std light_jitter (x the camera's distance, or scene units with
    # light_jitter_absolute: threestudio's light_position_perturb); magic3d, within 60 degrees of the camera's
    # direction (30 to 90 degrees above the plane across it, any angle around it).
    light_sample: Literal["dreamfusion", "magic3d"] = "dreamfusion"
    light_jitter: float = 0.5
    light_jitter_absolute: bool = False
    # mlp: learned per view direction; solid: background_color; random: one random colour per training image;
    # white_or_black: white or black with equal chance, one draw per training render (DreamGaussian's
    # invert_bg_prob 0.5). Outside training every kind but mlp shows background_color.
    background: Literal["mlp", "solid", "random", "white_or_black"] = "mlp"
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Probability that a training render's background is replaced by one random colour per image (threestudio's
    # random_aug, which ProlificDreamer turns on): the object cannot lean on one learned background. Never at
    # evaluation or export. The mesh stage has its own, mesh.random_aug.
    random_aug: float = 0.0
    random_aug_shared: bool = False  # one random colour for the whole batch (share_aug_bg: MVDream's views)
    progressive: tuple[tuple[int, int, int], ...] = ()  # (from step, square size, batch): threed/schedule.py
    chunk_rays: int = 16384
    # ProlificDreamer renders small while the coarse shape forms, then at full size: from `hires_step` on the
    # training renders are hires_width x hires_height (< 0: never).
    hires_step: int = -1
    hires_width: int = 512
    hires_height: int = 512
    hires_batch_size: int = 0  # renders per step from hires_step on (0: batch_size); MVDream: 8, then 4
    # Above this many rays per batch (e.g. 512x512), each chunk's activations are recomputed in backward
    # (gradient checkpointing) instead of kept: memory of one chunk for about one more forward (0: never).
    checkpoint_rays: int = 65536

    def size(self, step: int) -> tuple[int, int]:
        """(width, height) of the training renders at `step` (threed/schedule.py, render_size)."""
        return render_size(self, step)


@dataclass
class CameraConfig:
    """Random spherical cameras looking at the origin (degrees, scene units)."""

    distance: tuple[float, float] = (1.5, 2.0)
    fovy: tuple[float, float] = (40.0, 70.0)
    elevation: tuple[float, float] = (-10.0, 45.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    eval_distance: float = 1.75
    eval_fovy: float = 55.0
    eval_elevation: float = 15.0
    front_threshold: float = 45.0  # half-angle of the azimuth range called "front"
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    # The share of batches whose elevations are uniform over the sphere's area between the elevation bounds
    # rather than uniform in degrees (threestudio: half; uniform in degrees crowds views towards the poles).
    elevation_sphere_prob: float = 0.0
    # Training cameras perturbed as threestudio's random-camera data does (0: off): the position moved by up
    # to `position_jitter` along each axis (uniform), the point looked at by Gaussian noise of std
    # `center_jitter`, the up vector by Gaussian noise of std `up_jitter` (scene units). Evaluation views never.
    position_jitter: float = 0.0
    center_jitter: float = 0.0
    up_jitter: float = 0.0
    views: int = 1  # cameras per object (MVDream: 4), see threed/cameras.py sample_multiview_cameras
    distance_relative: bool = False  # distance x 1 / tan(fovy / 2) (MVDream-threestudio's relative_radius)


@dataclass
class OptimConfig:
    """The optimiser of every stage's scene; the learning rates are schedules (a number, or [start_step, start,
    end, end_step]). threestudio's ProlificDreamer trains its hash grid at 0.01 and its MLPs at 0.001 with
    AdamW (weight decay: PyTorch's default, 0.01); DreamFusion and Magic3D use Adam and one rate."""

    optimizer: Literal["adam", "adamw"] = "adam"  # adamw: weight decay decoupled from the gradient
    lr: Schedule = Schedule.constant(0.01)  # the field's hash grid (and its MLP, unless lr_mlp is set)
    lr_mlp: Schedule = Schedule.constant(-1.0)  # the field's MLP; < 0: optim.lr, in one group with the grid
    lr_background: Schedule = Schedule.constant(0.001)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.0


def same_as_lr(schedule: Schedule) -> bool:
    """A per-part learning rate left at its < 0 default: the part trains with the rate of the part it belongs
    to (optim.lr_mlp -> optim.lr, mesh.lr_texture_mlp -> mesh.lr_texture), in that part's optimiser group."""
    return schedule.is_constant and schedule.start < 0


@dataclass
class LossConfig:
    """Weights of the named losses (schedules); the total is their weighted sum. A loss whose weight is
    zero throughout is not computed."""

    guidance: Schedule = Schedule.constant(1.0)
    opacity: Schedule = Schedule.constant(0.0)  # mean rendered opacity: removes floaters the guidance cannot see
    transmittance: Schedule = Schedule.constant(0.0)  # Dream Fields: -min(target, mean transmittance)
    transmittance_target: Schedule = Schedule(0, 0.5, 0.88, 500)  # the target, annealed
    # mean sqrt(opacity^2 + 0.01): threestudio's sparsity loss (DreamFusion, Magic3D coarse, ProlificDreamer)
    sparsity: Schedule = Schedule.constant(0.0)
    # DreamFusion's normal orientation penalty: per ray with opacity > 0, weights detached (threed/render/volume.py)
    orient: Schedule = Schedule.constant(0.0)
    entropy: Schedule = Schedule.constant(0.0)  # binary entropy of opacity: pushes it to 0 or 1
    # threestudio's zero123 normal smoothness (threed/scenes/nerf.py): squared differences of neighbouring pixels
    # of the rendered normal map (lambda_normal_smooth), and |n(x) - n(x + 0.01 eps)| at the samples
    # (lambda_3d_normal_smooth)
    normal_smooth: Schedule = Schedule.constant(0.0)
    normal_smooth_3d: Schedule = Schedule.constant(0.0)


@dataclass
class ExportConfig:
    resolution: int = 256  # marching-cubes grid per axis
    threshold: float = -1.0  # density level; < 0 picks it automatically (silhouette agreement)
    keep_components: float = 0.05  # drop connected parts smaller than this fraction of the largest
    decimate_faces: int = 0  # target face count (0: off)
    formats: tuple[str, ...] = ("obj", "glb")
    # OBJ and GLB with a baked albedo texture (threed/texture.py: decimate to texture_max_faces, xatlas UV
    # atlas, texture_size² PNG) instead of vertex colours; PLY keeps vertex colours.
    texture: bool = False
    texture_size: int = 1024
    texture_max_faces: int = 50000
    video: bool = True
    video_frames: int = 48
    video_resolution: int = 256
    video_fps: int = 24
    preview_views: int = 8
