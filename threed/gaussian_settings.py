"""The settings of DreamGaussian's Gaussian stage (`gaussians:`), with their range checks; threed/config.py
puts them in the run's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from threed.schedule import Schedule


@dataclass
class GaussianConfig:
    """The 3D Gaussians of DreamGaussian's first stage (threed/fields/gaussians.py, threed/scenes/gaussians.py),
    rendered by threed/render/splat.py. Defaults are DreamGaussian's text config (configs/text.yaml there).
    Steps count the stage's own (from 0), as the run's `steps`; densification happens after the step
    numbered k x densify_every (counting from 1, as there)."""

    backend: Literal["auto", "torch", "gsplat"] = "auto"  # auto: gsplat on CUDA when importable, else torch
    num_points: int = 5000  # started uniform in a ball
    init_radius: float = 0.5
    init_opacity: float = 0.1
    # Start from a user's mesh (num_points on its surface) or .ply point cloud (its points) instead of the ball:
    # centred, its up and front axes turned to +y and +z, its largest |coordinate| init_radius
    # (threed/fields/gaussian_init.py; threed run --init-mesh, --init-mesh-up, --init-mesh-front).
    init_mesh: str = ""
    init_mesh_up: Literal["+x", "+y", "+z", "-x", "-y", "-z"] = "+y"
    init_mesh_front: Literal["+x", "+y", "+z", "-x", "-y", "-z"] = "+z"
    # learning rates of the parameter groups; the position's is 3DGS's exponential decay, DreamGaussian's
    # position_lr_init/final x its spatial_lr_scale 10 over position_lr_max_steps
    lr_position: Schedule = Schedule(0, 0.01, 0.0002, 300, "exponential")
    lr_color: Schedule = Schedule.constant(0.01)  # feature_lr (the degree-0 SH coefficients)
    lr_opacity: Schedule = Schedule.constant(0.05)  # of the logit
    lr_scale: Schedule = Schedule.constant(0.005)  # of the log-scales
    lr_rotation: Schedule = Schedule.constant(0.005)
    # View-dependent colour: spherical harmonics up to sh_degree (0-3; DreamGaussian's configs use 0), the degree
    # in use rising by one every sh_degree_every steps from 0 (3DGS's oneupSHdegree, every 1000 iterations),
    # the higher degrees' coefficients learning at lr_sh_rest (3DGS: feature_lr / 20)
    sh_degree: int = 0
    sh_degree_every: int = 1000
    lr_sh_rest: Schedule = Schedule.constant(0.0005)
    densify_from: int = 0  # density_start_iter
    densify_until: int = 3000  # density_end_iter
    densify_every: int = 50  # densification_interval
    grad_threshold: float = 0.01  # densify_grad_threshold: mean NDC gradient norm of a projected mean
    percent_dense: float = 0.01  # clone up to this x extent (largest scale), split above
    extent: float = 4.0  # the scene extent DreamGaussian passes to densify_and_prune
    min_opacity: float = 0.01  # pruned below
    prune_world_size: float = 0.1  # pruned when the largest scale exceeds this x extent (0: off)
    # Pruned when seen larger than this many pixels (0: off). DreamGaussian passes 1 px, but its radii are
    # reset with the statistics just before the check, so it prunes nothing: 0 is what it does.
    prune_screen_size: float = 0.0
    opacity_reset_every: int = 700  # opacity_reset_interval (0: never)
    # Square renders growing in steps (DreamGaussian: 128² for the first 30% of the steps, 256² to 60%, then
    # 512²): from step grow_steps[i] on, the training renders are grow_sizes[i]² (empty: render.width/height).
    grow_steps: tuple[int, ...] = ()
    grow_sizes: tuple[int, ...] = ()
    # Adam steps fitting the texture stage's field to the Gaussians' colours on their surface (its start)
    texture_fit_steps: int = 200
    # The texture stage's objective: DreamGaussian's SDEdit refinement (sdedit: each render edited by the prior
    # through refine_steps DDIM steps from the timestep of refine_strength, an MSE toward the edit;
    # threed/guidance/sdedit.py), or the prior's SDS (sds). refine_strength runs over the texture stage's steps.
    texture_objective: Literal["sdedit", "sds"] = "sdedit"
    refine_steps: int = 50
    refine_strength: Schedule = Schedule(0, 0.803, 0.95, 49)
    block: int = 16  # the PyTorch rasterizer: a pixel considers the Gaussians whose 3σ boxes touch its block (a tile)


def gaussian_checks(g: GaussianConfig) -> list[tuple[bool, str, str]]:
    """Range checks of the gaussians section."""
    checks = [
        (g.num_points >= 1, "gaussians.num_points", "must be >= 1"),
        (g.init_radius > 0, "gaussians.init_radius", "must be positive"),
        (g.init_mesh_up[1] != g.init_mesh_front[1], "gaussians.init_mesh_front",
         "must be another axis than gaussians.init_mesh_up"),
        (0.0 < g.init_opacity < 1.0, "gaussians.init_opacity", "must be in (0, 1)"),
        (g.densify_every >= 1, "gaussians.densify_every", "must be >= 1"),
        (0 <= g.sh_degree <= 3, "gaussians.sh_degree", "must be 0, 1, 2 or 3"),
        (g.sh_degree_every >= 1, "gaussians.sh_degree_every", "must be >= 1"),
        (g.extent > 0, "gaussians.extent", "must be positive"),
        (0.0 <= g.min_opacity < 1.0, "gaussians.min_opacity", "must be in [0, 1)"),
        (g.opacity_reset_every >= 0, "gaussians.opacity_reset_every", "must be >= 0 (0: never)"),
        (g.block >= 1, "gaussians.block", "must be >= 1"),
        (g.texture_fit_steps >= 0, "gaussians.texture_fit_steps", "must be >= 0"),
        (g.refine_steps >= 1, "gaussians.refine_steps", "must be >= 1"),
        (0.0 <= g.refine_strength.bounds()[0] and g.refine_strength.bounds()[1] <= 1.0, "gaussians.refine_strength",
         "must be in [0, 1]"),
        (len(g.grow_steps) == len(g.grow_sizes) and min(g.grow_sizes, default=1) > 0
         and list(g.grow_steps) == sorted(g.grow_steps), "gaussians.grow_steps/grow_sizes",
         "must be as many ascending steps as positive sizes"),
    ]
    for name in ("lr_position", "lr_color", "lr_opacity", "lr_scale", "lr_rotation", "lr_sh_rest"):
        checks.append((getattr(g, name).bounds()[0] >= 0, f"gaussians.{name}", "must be >= 0"))
    return checks
