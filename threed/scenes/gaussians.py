"""DreamGaussian's first stage: 3D Gaussians (threed/fields/gaussians.py) splatted (threed/render/splat.py)
over the background (or by gsplat's CUDA kernels, threed/render/splat_gsplat.py, with the same conventions:
gaussians.backend), densified and pruned as they train.

The Gaussians carry colour only, so every render is an albedo render, as DreamGaussian's are; the previews'
"textureless" view paints them all one grey. The colour is degree-0 spherical harmonics, as in DreamGaussian's
configs, or view-dependent up to `gaussians.sh_degree` (the degree in use rising every
`gaussians.sh_degree_every` steps, as 3DGS raises it); the mesh and the texture stage take the degree-0 part.

After each optimiser step (`after_step`, called by the trainer) the gradients of the projected means feed the
densification statistics, and on DreamGaussian's schedule the set is densified, pruned and its opacities
reset, with the optimiser's moments kept in step with the rows.

The mesh (`export_mesh`) is DreamGaussian's: marching cubes of the summed opacity field Σ o_i G_i(x) at
`export.threshold` (DreamGaussian's density_thresh, 1; < 0: the level whose silhouettes agree best with the
rendered opacity, as for a NeRF), cleaned and decimated by threed/mesh.py, its colours (and a baked texture's)
the opacity-weighted colour of the Gaussians there. The texture stage after it (threed/stages.py) starts from
that surface.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from threed.cameras import Cameras, orbit_cameras
from threed.config import Config
from threed.errors import UserError, first_line
from threed.fields.dmtet import DMTetGeometry
from threed.fields.gaussians import Gaussians
from threed.fields.nerf import NeRFField
from threed.mesh import auto_threshold, density_grid, extract_mesh
from threed.render import splat, splat_gsplat
from threed.render.splat_gsplat import choose_backend
from threed.render.background import Background
from threed.render.volume import RenderOutput
from threed.schedule import Schedule
from threed.scenes import ExportedMesh, render_each, weight_used
from threed.scenes.mesh import MeshScene
from threed.scenes.nerf import silhouette_cameras

PREVIEW_GREY = 0.7  # the colour of every Gaussian in a "textureless" render
GAUSSIANS_PLY = "gaussians.ply"
GAUSSIANS_PNG = "gaussians.png"  # the Gaussians themselves, splatted from evenly spaced views (the report's)


class GaussianScene:
    """Gaussians + background + the splatting rasterizer (see the module docstring)."""

    def __init__(self, cfg: Config, device: torch.device | str, gaussians: Gaussians | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        g = cfg.gaussians
        self.backend = choose_backend(g.backend, self.device)  # gsplat on CUDA when importable, else torch
        if gaussians is None and g.init_mesh:  # a user's mesh or point cloud (threed/fields/gaussian_init.py)
            from threed.fields.gaussian_init import load_init_points

            points, colors = load_init_points(g.init_mesh, g.num_points, g.init_radius, g.init_mesh_up,
                                              g.init_mesh_front, cfg.seed)
            gaussians = Gaussians.from_points(points, colors, g.init_opacity, g.sh_degree)
        if gaussians is None:
            gaussians = Gaussians.ball(g.num_points, g.init_radius, g.init_opacity,
                                       torch.Generator().manual_seed(cfg.seed), g.sh_degree)
        self.gaussians = gaussians.to(self.device)
        self.background = Background(cfg.render).to(self.device)
        self.losses = cfg.loss
        self.last_densify: dict[str, int] = {}
        self._views: tuple[list[Tensor], Tensor, int, int] | None = None  # the last training render's
        self.sh_active = 0  # the spherical-harmonic degree in use (set_step)

    @classmethod
    def from_state(cls, cfg: Config, state: dict, device: torch.device | str) -> "GaussianScene":
        """The scene a gaussians-stage checkpoint holds (its number of Gaussians included)."""
        if "gaussians" not in state:
            raise UserError("the checkpoint holds no Gaussians: pass a checkpoints/gaussians/step-*.pt file")
        scene = cls(cfg, device, Gaussians.empty(int(state["gaussians"]["means"].shape[0]), cfg.gaussians.sh_degree))
        scene.load_state_dict(state)
        return scene

    # -- the Scene interface (threed/scenes/__init__.py) ----------------------------------------------
    def param_groups(self) -> list[tuple[list[Tensor], Schedule]]:
        """One group per parameter, at DreamGaussian's rates (gaussians.lr_*; the higher spherical-harmonic
        degrees' only when there are any), then the background if it learns (optim.lr_background)."""
        g, gs = self.cfg.gaussians, self.gaussians
        groups = [([gs.means], g.lr_position), ([gs.f_dc], g.lr_color), ([gs.logit_opacities], g.lr_opacity),
                  ([gs.log_scales], g.lr_scale), ([gs.quaternions], g.lr_rotation)]
        if g.sh_degree > 0:
            groups.append(([gs.f_rest], g.lr_sh_rest))
        bg_params = list(self.background.parameters())
        if bg_params:
            groups.append((bg_params, self.cfg.optim.lr_background))
        return groups

    def describe(self) -> str:
        return f"gaussians: {len(self.gaussians)} | rasterizer: {self.backend}"

    def train(self) -> None:
        self.gaussians.train()
        self.background.train()

    def eval(self) -> None:
        self.gaussians.eval()
        self.background.eval()

    def prepare(self, step: int, generator: torch.Generator | None = None) -> None:
        self.set_step(step)

    def set_step(self, step: int) -> None:
        """The spherical-harmonic degree in use at `step`: one more every gaussians.sh_degree_every steps."""
        g = self.cfg.gaussians
        self.sh_active = min(g.sh_degree, step // g.sh_degree_every)

    def pick_shading(self, step: int, generator: torch.Generator) -> str:
        return "albedo"

    def render_size(self, step: int) -> tuple[int, int]:
        """The training renders' size at `step`: gaussians.grow_sizes[i]² from grow_steps[i] on, else the run's."""
        g = self.cfg.gaussians
        grown = [size for at, size in zip(g.grow_steps, g.grow_sizes) if step >= at]
        return (grown[-1], grown[-1]) if grown else self.cfg.render.size(step)

    def render(self, cameras: Cameras, shading: str, need_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutput:
        """Every camera's splat over the background: (B, H, W, *) like the volume renderer's, rows top first."""
        gs = self.gaussians
        _, dirs = cameras.rays()
        bg = self.background(dirs, generator)
        if shading != "albedo":
            colors = torch.full_like(gs.f_dc, PREVIEW_GREY)
        elif self.sh_active > 0:
            colors = gs.colors_seen_from(cameras.c2w[:, :3, 3], self.sh_active)  # (B, N, 3)
        else:
            colors = gs.colors
        args = (gs.means, gs.scales, gs.quaternions, gs.opacities, colors, cameras.c2w, cameras.fovy, cameras.width,
                cameras.height, bg)
        if self.backend == "gsplat":
            out = splat_gsplat.render(*args)
        else:
            out = splat.render(*args, block=self.cfg.gaussians.block)
        if self.gaussians.training and torch.is_grad_enabled():
            self._views = (out.means2d, out.radii.detach(), cameras.width, cameras.height)
        return RenderOutput(out.rgb, out.opacity, out.depth, bg, out.rgb.new_zeros(()))

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        result: dict[str, Tensor] = {}
        if weight_used(self.losses, "opacity"):
            result["opacity"] = out.opacity.mean()
        return result

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """After the optimiser's step numbered `step` (from 1): statistics, then, on the schedule, densify and
        prune, and reset the opacities (DreamGaussian's order)."""
        g, gs = self.cfg.gaussians, self.gaussians
        if self._views is None or not (g.densify_from <= step <= g.densify_until):
            self._views = None
            return
        means2d, radii, width, height = self._views
        self._views = None
        gs.add_stats(means2d, radii, width, height)
        if step % g.densify_every == 0:
            self.last_densify = gs.densify_and_prune(optimizer, g.grad_threshold, g.extent, g.percent_dense,
                                                     g.min_opacity, g.prune_world_size, g.prune_screen_size,
                                                     generator)
            if len(gs) == 0:
                raise UserError(f"every Gaussian was pruned at step {step}: lower gaussians.min_opacity or "
                                f"raise gaussians.init_opacity")
        if g.opacity_reset_every > 0 and step % g.opacity_reset_every == 0:
            gs.reset_opacity(optimizer)

    def state_dict(self) -> dict:
        return {"gaussians": self.gaussians.state_dict(), "background": self.background.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "gaussians" not in state:
            raise UserError("the checkpoint holds no Gaussians: pass a checkpoints/gaussians/step-*.pt file")
        try:
            self.gaussians.load_state_dict(state["gaussians"])
            self.background.load_state_dict(state["background"])
        except (RuntimeError, AttributeError, KeyError) as e:
            raise UserError(f"the checkpoint does not match this Gaussian scene ({first_line(e)})") from None

    # -- export -----------------------------------------------------------------------------------------
    def density(self, points: Tensor) -> Tensor:
        """The summed opacity field at (M, 3) points."""
        return self.gaussians.field(points)[0]

    def albedo(self, points: Tensor) -> Tensor:
        """The opacity-weighted colour of the Gaussians at (M, 3) points."""
        return self.gaussians.field(points)[1]

    @torch.no_grad()
    def export_files(self, run_dir: Path) -> list[Path]:
        """The Gaussians as a standard 3DGS .ply (RUN/gaussians.ply) that splat viewers open, and a row of
        export.preview_views renders of them by the splat rasterizer (RUN/gaussians.png; none when 0), the
        report's picture of the Gaussians beside the mesh they became."""
        from exporters.splat_ply import write_splat_ply

        gs = self.gaussians
        arrays = {name: p.detach().float().cpu().numpy() for name, p in gs.named_groups()}
        written = [write_splat_ply(Path(run_dir) / GAUSSIANS_PLY, arrays["means"], arrays["log_scales"],
                                   arrays["quaternions"], arrays["logit_opacities"], arrays["f_dc"],
                                   arrays["f_rest"])]
        n = self.cfg.export.preview_views
        if n > 0:
            from exporters.video import write_image_grid

            side = max(16, min(256, self.cfg.export.video_resolution))
            self.eval()
            frames, _ = render_each(self, orbit_cameras(self.cfg.camera, n, side, side), "albedo", self.device,
                                    False, "Gaussians")
            written.append(write_image_grid(list(frames), Path(run_dir) / GAUSSIANS_PNG, cols=n))
        return written

    @torch.no_grad()
    def export_mesh(self, resolution: int | None = None, threshold: float | None = None,
                    progress: bool | None = False) -> ExportedMesh:
        """Marching cubes of the summed opacity field (see the module docstring)."""
        cfg = self.cfg
        res = resolution or cfg.export.resolution
        bound = cfg.render.bound
        grid = density_grid(self.density, bound, res, self.device, progress=progress)
        given = cfg.export.threshold if threshold is None else threshold
        level = given
        if level < 0:
            cams = silhouette_cameras(cfg, 64)
            _, opacity = render_each(self, cams, "albedo", self.device, progress, "mesh level: silhouettes")
            rays_o, rays_d = cams.rays()
            level = auto_threshold(grid, bound, rays_o, rays_d, torch.from_numpy(opacity), progress=progress)
        if not bool((grid > level).any()):
            raise UserError(f"the Gaussians' opacity field never reaches {level:g}: pass a lower export.threshold "
                            f"(or -1 to choose it from the silhouettes)")
        mesh = extract_mesh(self.density, self.albedo, bound, res, level, cfg.export.keep_components,
                            cfg.export.decimate_faces, device=self.device, grid=grid, progress=progress)
        about = {"threshold": float(level), "threshold_chosen": "given" if given >= 0 else "auto",
                 "resolution": int(res), "bound": float(bound), "gaussians": len(self.gaussians)}
        return ExportedMesh(mesh, about, self.albedo, inset=bound / (res - 1))


def texture_scene(cfg: Config, scene: GaussianScene, level: float, device: torch.device | str,
                  progress: bool = True, fit_steps: int = 200, fit_batch: int = 8192,
                  scene_class: type[MeshScene] = MeshScene) -> MeshScene:
    """DreamGaussian's second stage starts here: the surface of the Gaussians' opacity field at `level` (the
    kept mesh's) on a tetrahedral grid whose learning rates the texture section keeps at 0, and a texture field
    fitted (`fit_steps` Adam steps on `fit_batch` points near the surface, mean squared error) to the
    Gaussians' colours there, as DreamGaussian bakes their renders into its UV texture before refining it. The
    colours are evaluated once, at 8 batches' worth of points, which the steps draw their batches from.
    `scene_class`: the mesh scene to build (the image run's keeps its reference view)."""
    m = cfg.mesh
    scene.eval()
    geometry = DMTetGeometry.from_density(scene.density, level, bound=cfg.render.bound, resolution=m.resolution,
                                          keep_components=cfg.export.keep_components, device=device,
                                          progress=progress, deform=m.deform_scale > 0,
                                          deform_scale=m.deform_scale, smoothing=m.start_smoothing)
    texture = NeRFField(cfg.field, cfg.render.bound, device)
    with torch.no_grad():
        vertices, _ = geometry.extract()
        cell = 2 * cfg.render.bound / m.resolution
        generator = torch.Generator().manual_seed(cfg.seed)
        points = vertices.detach().float()
        # the Gaussians' colours once, at a pool of points jittered within a cell of the surface (8 batches):
        # each step then draws its batch from the pool instead of evaluating the Gaussians again
        size = min(fit_steps, 8) * fit_batch
        pick = torch.randint(0, len(points), (size,), generator=generator).to(points.device)
        jitter = (torch.rand(size, 3, generator=generator).to(points.device) - 0.5) * cell
        pool = (points[pick] + jitter).clamp(-cfg.render.bound, cfg.render.bound)
        targets = scene.albedo(pool) if size else pool
    optimizer = torch.optim.Adam(texture.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-15)
    for _ in range(fit_steps):
        batch = torch.randint(0, size, (min(fit_batch, size),), generator=generator).to(points.device)
        loss = (texture.albedo(pool[batch]) - targets[batch]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    bg = Background(cfg.render).to(device)
    bg.take_from(scene.background.state_dict())
    return scene_class(cfg, geometry, texture, bg, device)
