"""Volume rendering of the field along camera rays: a pure-PyTorch path and a nerfacc path.

Both evaluate the same quadrature (threed/render/quadrature.py): for samples t_i over intervals delta_i
along a ray,

    alpha_i = 1 - exp(-sigma_i delta_i),   T_i = prod_{j<i} (1 - alpha_j),   w_i = alpha_i T_i,
    colour = sum_i w_i c_i + (1 - sum_i w_i) * background,

with c_i the shaded albedo at the sample. The PyTorch path takes `num_samples` stratified samples between
each ray's entry into and exit from the scene cube (any device) and skips the field where an occupancy grid
says space is empty. The nerfacc path (CUDA only) marches with step diagonal / num_samples and skips empty
space with nerfacc's occupancy grid. A chunk of rays may see no occupied space at all: both paths then
evaluate the field on zero points and composite the background alone.

With `normal_terms` (a run whose losses smooth normals, threestudio's zero123 system) a render also returns
the normal map threestudio composites, (normalize(sum_i w_i n_i) + 1) / 2 * opacity per pixel, and the mean
|n(x) - n(x + 0.01 eps)| (eps ~ N(0, I)) over the samples that get normals: the 2-D and 3-D normal-smoothness
terms' inputs (threed/scenes/nerf.py).

Host syncs are kept to what compaction needs: one per chunk for the occupied samples (PyTorch path), one
for the samples that get normals, none for random numbers (drawn on the device, threed/render/rng.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from threed.accelerators import importable_for
from threed.cameras import Cameras
from threed.config import RenderConfig
from threed.errors import UserError
from threed.fields.nerf import NeRFField
from threed.render.background import Background
from threed.render.occupancy import OccupancyGrid
from threed.render.quadrature import accumulate_along_rays, weights_from_densities
from threed.render.rng import gaussian, uniform
from threed.render.shading import shade, soft_ambient


@dataclass
class RenderOutput:
    rgb: Tensor  # (B, H, W, 3) composited over the background
    opacity: Tensor  # (B, H, W, 1)
    depth: Tensor  # (B, H, W, 1)
    background: Tensor  # (B, H, W, 3)
    # scalar: DreamFusion's penalty on normals facing away from the camera, the sum over samples of
    # stopgrad(w_i) * max(0, n_i . d)^2 divided by the number of rays with opacity > 0 (threestudio's)
    orient: Tensor
    # with normal_terms: the composited normal map in [0, 1], (normalize(sum w n) + 1) / 2 * opacity, (B, H, W, 3)
    normal: Tensor | None = None
    # with normal_terms: mean over samples with normals and over xyz of |n(x) - n(x + PERTURB * eps)| (scalar)
    normal_perturb: Tensor | None = None


PERTURB = 0.01  # threestudio's jitter of the sample positions for the 3-D normal smoothness (scene units)


def ray_aabb(rays_o: Tensor, rays_d: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances of rays through the cube [-bound, bound]^3 (slab method); misses give near = far."""
    inv = 1.0 / torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0 = (-bound - rays_o) * inv
    t1 = (bound - rays_o) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    far = torch.maximum(far, near)
    return near, far


def nerfacc_available(device: torch.device | str) -> bool:
    return importable_for(device, "nerfacc")  # CUDA only: on CPU tensors its kernels try to JIT-build


def checkpointed(fn, args: tuple, generator: torch.Generator | None) -> tuple[Tensor, ...]:
    """fn(*args) with gradient checkpointing: its activations are recomputed in backward instead of kept.

    torch.utils.checkpoint replays the global RNGs for the recomputation but not an explicit `generator`;
    this rewinds it to where the first pass started, so the recomputed chunk takes the same stratified
    samples, then puts it back, so the run's random stream is the same as without checkpointing.
    """
    from torch.utils.checkpoint import checkpoint

    start = generator.get_state() if generator is not None else None
    calls = [0]

    def run(*inputs):
        calls[0] += 1
        if start is None or calls[0] == 1:
            return fn(*inputs)
        after = generator.get_state()
        generator.set_state(start)
        try:
            return fn(*inputs)
        finally:
            generator.set_state(after)

    return checkpoint(run, *args, use_reentrant=False)


class VolumeRenderer(nn.Module):
    def __init__(self, cfg: RenderConfig, device: torch.device | str):
        super().__init__()
        self.cfg = cfg
        want = cfg.backend
        if want == "nerfacc" and not nerfacc_available(device):
            raise UserError("render.backend=nerfacc needs CUDA and nerfacc (pip install nerfacc); "
                            "use render.backend=torch")
        self.backend = "nerfacc" if want == "nerfacc" or (want == "auto" and nerfacc_available(device)) else "torch"
        self.estimator = None
        self.occupancy: OccupancyGrid | None = None
        b = cfg.bound
        self.step_size = 2.0 * math.sqrt(3.0) * b / cfg.num_samples
        if self.backend == "torch" and cfg.occupancy_resolution > 0:
            # occupancy in a cell = density * the spacing of this path's samples along the cube's diagonal
            self.occupancy = OccupancyGrid(b, cfg.occupancy_resolution, cfg.occupancy_threshold,
                                           self.step_size).to(device)
        if self.backend == "nerfacc":
            import nerfacc  # accelerator: imported only when chosen

            self.estimator = nerfacc.OccGridEstimator(
                roi_aabb=[-b, -b, -b, b, b, b], resolution=cfg.occupancy_resolution, levels=1).to(device)

    def update_occupancy(self, field: NeRFField, step: int, generator: torch.Generator | None = None) -> None:
        """Refresh the occupancy grid every `occupancy_update_every` steps: occupancy = density * step size."""
        if self.occupancy is not None:
            if step % self.cfg.occupancy_update_every == 0:
                self.occupancy.update(field.density, generator)
            return
        if self.estimator is None:
            return
        self.estimator.train()
        self.estimator.update_every_n_steps(
            step=step, occ_eval_fn=self._occupancy_fn(field), occ_thre=self.cfg.occupancy_threshold,
            n=self.cfg.occupancy_update_every)

    @torch.no_grad()
    def rebuild_occupancy(self, field: NeRFField) -> None:
        """Fill the occupancy grid from the field at once (e.g. a checkpoint from the other backend)."""
        if self.occupancy is not None:
            self.occupancy.update(field.density)
        elif self.estimator is not None:  # step 0 is in the warm-up: every cell is evaluated
            self.estimator._update(step=0, occ_eval_fn=self._occupancy_fn(field),
                                   occ_thre=self.cfg.occupancy_threshold)

    def _occupancy_fn(self, field: NeRFField):
        """nerfacc's occupancy: density times the marching step (the opacity one step would add)."""
        return lambda x: field.density(x) * self.step_size

    # -- per-sample work shared by both paths -------------------------------------------------
    def _shade_samples(self, field: NeRFField, pts: Tensor, dirs: Tensor, light: Tensor, albedo: Tensor,
                       weights: Tensor, shading: str, need_normals: bool, ambient: float
                       ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Colour (N, 3), orientation penalty (N,), normals (N, 3) and the indices of the samples that got
        normals (the last three None without normals) of samples with compositing `weights` (N,).

        Normals cost six density evaluations each (finite differences), so they are computed only where a
        sample's weight is above 1e-4; elsewhere the sample is shaded with ambient light alone (n = 0) and
        contributes nothing visible. Finding those samples is this function's one host sync.
        """
        if shading == "albedo" and not need_normals:
            return albedo, None, None, None
        visible = (weights.detach() > 1e-4).nonzero().squeeze(1)
        normal = torch.zeros_like(pts).index_put((visible,), field.normal(pts[visible]))
        color = shade(albedo, normal, pts, light, shading, ambient)
        orient = (normal * dirs).sum(-1).clamp_min(0.0) ** 2  # normals pointing away from the camera
        return color, orient, normal, visible

    def _composite(self, field: NeRFField, pts: Tensor, dirs: Tensor, light: Tensor, albedo: Tensor,
                   weights: Tensor, t: Tensor, ray_indices: Tensor | None, n_rays: int, shading: str,
                   need_normals: bool, ambient: float, normal_terms: bool = False,
                   generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """Shade the samples and accumulate colour, opacity, depth and the orientation penalty per ray; with
        `normal_terms` also the normals (n_rays, 3) and the perturbed normals' sum of |differences| and count.

        `weights` and `t` are batched (n_rays, S) when `ray_indices` is None, else packed (N,); the
        per-sample tensors `pts`, `dirs`, `light`, `albedo` are flat (N, 3) in the same order.
        """
        color, orient, normal, visible = self._shade_samples(field, pts, dirs, light, albedo, weights.reshape(-1),
                                                             shading, need_normals or normal_terms, ambient)
        terms: tuple[Tensor, ...] = ()
        if normal_terms:
            assert normal is not None and visible is not None
            normals = accumulate_along_rays(weights, normal.view(*weights.shape, 3), ray_indices, n_rays)
            jitter = gaussian((len(visible), 3), generator, pts.device) * PERTURB
            moved = field.normal(pts[visible] + jitter) if len(visible) else pts.new_zeros(0, 3)
            diff_sum = (normal[visible] - moved).abs().sum()
            terms = (normals, diff_sum, pts.new_tensor(3.0 * len(visible)))
        rgb = accumulate_along_rays(weights, color.view(*weights.shape, 3), ray_indices, n_rays)
        opacity = accumulate_along_rays(weights, None, ray_indices, n_rays)
        depth = accumulate_along_rays(weights, t.view(*weights.shape, 1), ray_indices, n_rays)
        # The weights are detached (DreamFusion, stable-dreamfusion, threestudio): the penalty turns normals away
        # from the camera, instead of being paid by removing the density where normals face away.
        orient_sum = (weights.detach().reshape(-1) * orient).sum() if orient is not None else rgb.new_zeros(())
        return rgb, opacity, depth, orient_sum, *terms

    def _render_torch(self, field: NeRFField, rays_o: Tensor, rays_d: Tensor, light: Tensor, shading: str,
                      need_normals: bool, generator: torch.Generator | None, ambient: float,
                      normal_terms: bool = False) -> tuple[Tensor, ...]:
        n, s = rays_o.shape[0], self.cfg.num_samples
        near, far = ray_aabb(rays_o, rays_d, self.cfg.bound)
        if field.training:
            u = uniform((n, s), generator, rays_o.device)
        else:
            u = torch.full((n, s), 0.5, device=rays_o.device)
        delta = ((far - near) / s)[:, None]  # (N, 1): each sample stands for its stratum of this length
        t = near[:, None] + (torch.arange(s, device=rays_o.device)[None] + u) * delta  # (N, S)
        pts = (rays_o[:, None] + t[..., None] * rays_d[:, None]).reshape(-1, 3)
        if self.occupancy is None:
            sigma, albedo = field(pts)
        else:  # evaluate the field only in occupied cells (possibly none): one host sync for the count
            occupied = self.occupancy.query(pts).nonzero().squeeze(1)
            if self.cfg.alpha_threshold > 0:
                occupied = self._visible(field, pts, occupied, delta.expand(n, s).reshape(-1))
            s_occ, a_occ = field(pts[occupied])
            sigma = pts.new_zeros(len(pts)).index_put((occupied,), s_occ)
            albedo = pts.new_zeros(len(pts), 3).index_put((occupied,), a_occ)
        weights, _, _ = weights_from_densities(sigma.view(n, s), delta)
        dirs = rays_d[:, None].expand(n, s, 3).reshape(-1, 3)
        lights = light[:, None].expand(n, s, 3).reshape(-1, 3)
        return self._composite(field, pts, dirs, lights, albedo, weights, t, None, n, shading, need_normals, ambient,
                               normal_terms, generator)

    @torch.no_grad()
    def _visible(self, field: NeRFField, pts: Tensor, occupied: Tensor, delta: Tensor) -> Tensor:
        """The indices among `occupied` whose alpha reaches render.alpha_threshold, or the occupancy grid's mean
        value where that is smaller (nerfacc's alpha_thre): densities evaluated once without gradients."""
        assert self.occupancy is not None
        threshold = self.occupancy.occs.mean().clamp(max=self.cfg.alpha_threshold)  # on the device: no host sync
        alpha = 1.0 - torch.exp(-field.density(pts[occupied]) * delta[occupied])
        return occupied[alpha >= threshold]  # (the count: this path's second host sync)

    def _render_nerfacc(self, field: NeRFField, rays_o: Tensor, rays_d: Tensor, light: Tensor, shading: str,
                        need_normals: bool, generator: torch.Generator | None, ambient: float,
                        normal_terms: bool = False) -> tuple[Tensor, ...]:
        assert self.estimator is not None
        n = rays_o.shape[0]
        near, far = ray_aabb(rays_o, rays_d, self.cfg.bound)

        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            mid = (t_starts + t_ends)[:, None] * 0.5
            return field.density(rays_o[ray_indices] + mid * rays_d[ray_indices])

        # packed samples, grouped by ray in marching order; possibly none at all
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            rays_o, rays_d, sigma_fn=sigma_fn, t_min=near, t_max=far, render_step_size=self.step_size,
            stratified=field.training, early_stop_eps=1e-4, alpha_thre=self.cfg.alpha_threshold)
        ray_indices = ray_indices.long()  # nerfacc may return int32
        mid = (t_starts + t_ends) * 0.5
        pts = rays_o[ray_indices] + mid[:, None] * rays_d[ray_indices]
        sigma, albedo = field(pts)
        weights, _, _ = weights_from_densities(sigma, t_ends - t_starts, ray_indices, n)
        return self._composite(field, pts, rays_d[ray_indices], light[ray_indices], albedo, weights, mid,
                               ray_indices, n, shading, need_normals, ambient, normal_terms, generator)

    def forward(self, field: NeRFField, background: Background, cameras: Cameras, shading: str,
                need_normals: bool = False, generator: torch.Generator | None = None,
                normal_terms: bool = False) -> RenderOutput:
        """Render every pixel of every camera. Rays are processed in chunks of `render.chunk_rays`; above
        `render.checkpoint_rays` rays (with autograd on) each chunk is gradient-checkpointed. `normal_terms`:
        also the normal map and the perturbed-normal difference (RenderOutput.normal, normal_perturb)."""
        rays_o, rays_d = cameras.rays()
        b, h, w = rays_o.shape[:3]
        light = cameras.light_position[:, None, None, :].expand(b, h, w, 3).reshape(-1, 3)
        flat_o, flat_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
        render = self._render_nerfacc if self.backend == "nerfacc" else self._render_torch
        parts = []
        chunk = self.cfg.chunk_rays
        limit = self.cfg.checkpoint_rays
        recompute = torch.is_grad_enabled() and 0 < limit < flat_o.shape[0]
        # one light split per render (threestudio draws one per batch), drawn before the chunks so that a
        # recomputed chunk sees the same
        ambient = self.cfg.ambient
        if self.cfg.soft_shading and field.training and shading in ("lambertian", "textureless"):
            ambient = soft_ambient(generator)
        for i in range(0, max(flat_o.shape[0], 1), chunk):  # zero rays: one empty chunk
            sl = slice(i, i + chunk)
            args = (field, flat_o[sl], flat_d[sl], light[sl], shading, need_normals, generator, ambient, normal_terms)
            parts.append(checkpointed(render, args, generator) if recompute else render(*args))
        rgb = torch.cat([p[0] for p in parts]).view(b, h, w, 3)
        opacity = torch.cat([p[1] for p in parts]).view(b, h, w, 1)
        depth = torch.cat([p[2] for p in parts]).view(b, h, w, 1)
        # per ray that sees anything (threestudio's normalisation), not per ray of the batch
        orient = torch.stack([p[3] for p in parts]).sum() / (opacity > 0).sum().clamp_min(1)
        # normal maps (the image a geometry stage's prior scores) lie over black, as the mesh scene's do
        bg = torch.zeros_like(rays_d) if shading == "normal" else background(rays_d, generator)
        out = RenderOutput(rgb + (1.0 - opacity) * bg, opacity, depth, bg, orient)
        if normal_terms:  # threestudio's comp_normal: the unit composite normal in [0, 1], faded by opacity
            normals = torch.cat([p[4] for p in parts]).view(b, h, w, 3)
            unit = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out.normal = (unit + 1.0) * 0.5 * opacity
            out.normal_perturb = (torch.stack([p[5] for p in parts]).sum()
                                  / torch.stack([p[6] for p in parts]).sum().clamp_min(1.0))
        return out
