"""The oracle prior: the exact optimal denoiser of a finite set of reference renders, used through SDS.

No pretrained diffusion model is needed. For a training camera c the "data set" is K renders I_k of
a known reference mesh from c (k = 1) and from c with its azimuth/elevation jittered (k = 2..K), all
with the field render's own shading mode and background. With the Stable Diffusion schedule abar_t,

    x_t    = sqrt(abar) x + sqrt(1 - abar) eps               x = 2 rgb - 1 (the field's render)
    w_k    = softmax_k( -|x_t - sqrt(abar) I_k|^2 / (2 (1 - abar)) )
    x0_hat = sum_k w_k I_k
    eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)

and the usual SDS gradient w(t) (eps_hat - eps). Substituting x_t gives the same quantities as

    eps_hat = eps + r (x - x0_hat),   |x_t - sqrt(abar) I_k|^2 / (1 - abar) = |r (x - I_k) + eps|^2,
    r = sqrt(abar / (1 - abar)),

which is how they are computed here: no catastrophic cancellation, so with K = 1 a field that renders
the reference exactly gets a gradient of exactly zero, and eps_hat - eps = r (x - I) holds to rounding.
K = 1 is a noise-free, randomly scaled L2 pull toward the reference view; K > 1 is a genuine mixture
whose answer depends on the noise draw, closer to how a real prior behaves.

Fantasia3D's shadings: `pbr` renders the reference with its colours as albedo and guidance.oracle.roughness
and .metallic under the stage's environment (split-sum image-based lighting, the scene's formula);
`normal_latent` (the geometry warm-up) compares the normal map in [-1, 1] and the mask, both downsampled to
the latent's size as Stable Diffusion's guidance takes them.

Reference views are ray cast (threed/raycast.py) or, with guidance.oracle.renderer = raster, for the shadings a
mesh stage uses (normal, normal_latent, albedo, pbr), rasterized (threed/render/rasterize.py) at the same
supersampling with the same per-corner normals and shading formulas: the same images up to antialiasing at
silhouettes and rounding (tests/test_fantasia3d.py measures the agreement), several times faster on a CPU,
where the ray caster's reference renders dominated a mesh stage's step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import trimesh
from torch import Tensor

from threed import raycast
from threed.cameras import Cameras, make_cameras
from threed.errors import UserError
from threed.guidance import RandomStream, sds
from threed.io import load_mesh_file
from threed.render.rasterize import MeshRasterizer
from threed.render.shading import shade

if TYPE_CHECKING:
    from threed.config import Config

_HINT = "pass --reference PATH to an OBJ/PLY/GLB"
RASTER_SHADINGS = ("normal", "normal_latent", "albedo", "pbr")  # what guidance.oracle.renderer=raster rasterizes


def load_reference(path: str, bound: float) -> trimesh.Trimesh:
    """Load the reference mesh as-is (never re-centred or re-scaled); UserError if unusable."""
    if not path:
        raise UserError(f"the oracle prior needs a reference mesh: {_HINT}")
    mesh = load_mesh_file(path, "reference mesh", _HINT)
    extent = float(np.abs(mesh.vertices).max())
    if extent > bound * (1 + 1e-6):
        suggested = math.ceil(extent * 100) / 100
        raise UserError(f"reference mesh '{path}' extends to {extent:.3g}, beyond the scene bound {bound:g}: "
                        f"scale it into the cube or set render.bound={suggested:g}")
    return mesh


def reference_colors(mesh: trimesh.Trimesh, default: tuple[float, float, float]) -> np.ndarray:
    """Per-vertex RGB in [0, 1]: the mesh's vertex (or face, or texture-sampled) colours, else `default`."""
    visual = mesh.visual
    colors = None
    try:
        if visual.kind == "texture":
            visual = visual.to_color()
        if visual.kind in ("vertex", "face"):
            colors = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
    except Exception:  # a texture that cannot be sampled: fall back to the plain colour
        colors = None
    if colors is None or len(colors) != len(mesh.vertices):
        colors = np.tile(np.asarray(default, dtype=np.float64), (len(mesh.vertices), 1))
    return colors


def oracle_eps(x: Tensor, refs: Tensor, abar: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Optimal denoiser's noise prediction for images x (B, ...) given K references refs (B, K, ...).

    Returns (eps_hat like x, posterior weights (B, K)). See the module docstring for the formula.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    r = (abar / (1.0 - abar)).sqrt().to(x.dtype)
    diff = x[:, None] - refs  # (B, K, ...)
    resid = r.view(-1, 1, *shape[1:]) * diff + noise[:, None]
    logits = -0.5 * resid.flatten(2).pow(2).sum(-1)  # (B, K)
    weights = torch.softmax(logits, dim=1)
    x0_hat = (weights.view(*weights.shape, *([1] * (x.dim() - 1))) * refs).sum(1)
    if refs.shape[1] == 1:
        x0_hat = refs[:, 0]  # softmax of one logit is 1.0 exactly; keep I bit-exact
    return noise + r.view(shape) * (x - x0_hat), weights


class OracleGuidance(RandomStream):
    """SDS against the optimal denoiser of reference-mesh renders (see the module docstring). It reads the run
    config's guidance section (guidance.oracle and the shared SDS settings), render settings and seed."""

    def __init__(self, cfg: Config, device: str) -> None:
        g = self.cfg = cfg.guidance
        self.render_cfg = cfg.render
        self.device = torch.device(device)
        self.reference_mesh = load_reference(g.oracle.reference, cfg.render.bound)
        mesh = self.reference_mesh
        self.vertices = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=self.device)
        self.faces = torch.tensor(np.asarray(mesh.faces), dtype=torch.long, device=self.device)
        self.colors = torch.tensor(reference_colors(mesh, g.oracle.color), dtype=torch.float32, device=self.device)
        self.clusters = raycast.build_clusters(self.vertices, self.faces)
        self.normals = raycast.corner_normals(self.vertices, self.faces)
        self.alphas = sds.sd_alphas_cumprod().to(self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.supersample = 2
        self.stage_cfg = cfg.mesh  # a mesh stage's section: its environment for pbr shading
        self.latent_size = cfg.guidance.sd.resolution // 8
        self._environment = None
        n = len(mesh.vertices)
        self.roughness_metallic = torch.tensor([[g.oracle.roughness, g.oracle.metallic]], device=self.device).expand(n, 2)
        renderer = getattr(g.oracle, "renderer", "raycast")
        if renderer not in ("raycast", "raster"):
            raise UserError(f"unknown guidance.oracle.renderer {renderer!r}: use raycast or raster")
        self.raster = MeshRasterizer("torch", self.device) if renderer == "raster" else None

    def environment(self) -> tuple:
        """The stage's prefiltered environment and BRDF table (as the mesh scene builds them)."""
        if self._environment is None:
            from threed.render.ibl import brdf_lut, environment_light

            m = self.stage_cfg
            self._environment = (environment_light(getattr(m, "env_map", ""), getattr(m, "env_scale", 2.0),
                                                   device=self.device), brdf_lut(device=self.device))
        return self._environment

    def render_reference(self, cameras: Cameras, shading: str, background: Tensor) -> Tensor:
        """The reference mesh rendered like the field: (B, H, W, 3) in [0, 1] over `background`; for
        `normal_latent`, (B, H, W, 4): the normal map in [-1, 1] over -1, and the mask."""
        if self.raster is not None and shading in RASTER_SHADINGS:
            return self.rasterize_reference(cameras, shading, background)
        if shading == "normal_latent":
            zeros = torch.zeros_like(background)
            normal = self.render_reference(cameras, "normal", zeros)
            mask = raycast.render_mesh(self.vertices, self.faces, torch.ones_like(self.colors), cameras, "albedo",
                                       0.0, zeros, supersample=self.supersample, clusters=self.clusters)[..., :1]
            return torch.cat([normal * 2.0 - 1.0, mask], dim=-1)
        pbr = dict(environment=self.environment(), roughness_metallic=self.roughness_metallic) if shading == "pbr" else {}
        return raycast.render_mesh(self.vertices, self.faces, self.colors, cameras, shading, self.render_cfg.ambient,
                                   background, supersample=self.supersample, clusters=self.clusters,
                                   normals=self.normals, **pbr)

    @torch.no_grad()
    def rasterize_reference(self, cameras: Cameras, shading: str, background: Tensor) -> Tensor:
        """`render_reference` by rasterization: the ray caster's images (its s x s supersampling, per-corner
        normals turned toward the camera, shading formulas) from the mesh scene's rasterizer. Each face gets
        its own three corners, so the per-corner normals interpolate as the ray caster's do."""
        s = self.supersample
        cameras = cameras.to(self.device)
        b, h, w = len(cameras), cameras.height, cameras.width
        corners = self.faces.reshape(-1)
        tri = torch.arange(corners.numel(), device=self.device).view(-1, 3)
        points = self.vertices[corners]
        homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1)
        pos = torch.einsum("bij,vj->bvi", cameras.clip_matrices().float(), homogeneous)
        rast = self.raster.rasterize(pos, tri, (h * s, w * s))
        attrs = torch.cat([points, self.colors[corners], self.normals.reshape(-1, 3),
                           self.roughness_metallic[corners]], dim=-1)
        surface = self.raster.interpolate(attrs[None], rast, tri).flip(1)  # rows top first
        hit = rast[..., 3].flip(1) > 0  # (B, sH, sW)
        cam = torch.arange(b, device=self.device).view(b, 1, 1).expand_as(hit)[hit]
        point, albedo = surface[..., :3][hit], surface[..., 3:6][hit]
        mode = "normal" if shading == "normal_latent" else shading
        if mode == "normal":
            albedo = torch.ones_like(albedo)
        view = point - cameras.c2w[:, :3, 3].float()[cam]
        view = view / view.norm(dim=-1, keepdim=True).clamp_min(1e-20)
        normal = light = None
        if mode != "albedo":
            normal = surface[..., 6:9][hit]
            normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-20)
            normal = torch.where((normal * view).sum(-1, keepdim=True) > 0, -normal, normal)
            light = cameras.light_position.float()[cam]
        if mode == "pbr":
            from threed.render.ibl import shade_pbr

            env, lut = self.environment()
            rm = surface[..., 9:11][hit]
            color = shade_pbr(env, lut, albedo, rm[:, :1], rm[:, 1:], normal, view).clamp(0.0, 1.0)
        else:
            color = shade(albedo, normal, point, light, mode, self.render_cfg.ambient)
        image = surface.new_zeros(b, h * s, w * s, 3).index_put((hit,), color)
        image = image.view(b, h, s, w, s, 3).mean(dim=(2, 4))
        coverage = hit.float().view(b, h, s, w, s, 1).mean(dim=(2, 4))
        if shading == "normal_latent":  # the normal in [-1, 1] over -1, and the mask
            return torch.cat([image * 2.0 - 1.0, coverage], dim=-1)
        return image + (1.0 - coverage) * background.to(device=self.device, dtype=image.dtype)

    def reference_cameras(self, cameras: Cameras) -> list[Cameras]:
        """K camera sets: the given cameras, then K-1 copies with azimuth/elevation jittered."""
        views = [cameras]
        b = len(cameras)
        for _ in range(self.cfg.oracle.views - 1):
            jitter = torch.randn(2, b, generator=self.generator) * self.cfg.oracle.jitter
            elevation = (cameras.elevation.detach().cpu().float() + jitter[0]).clamp(-89.0, 89.0)
            azimuth = cameras.azimuth.detach().cpu().float() + jitter[1]
            views.append(make_cameras(elevation, azimuth, cameras.distance.detach().cpu().float(),
                                      torch.rad2deg(cameras.fovy.detach().cpu().float()), cameras.width,
                                      cameras.height, cameras.light_position.detach().cpu().float()))
        return views

    def _latent_size(self, images: Tensor) -> Tensor:
        """(N, H, W, C) images resized (bilinear) to the latent's size, as Stable Diffusion's guidance does."""
        size = (self.latent_size, self.latent_size)
        return torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size, mode="bilinear",
                                               align_corners=False).permute(0, 2, 3, 1)

    def sdedit_space(self, rgb: Tensor, cameras: Cameras, shading: str, background: Tensor):
        """For DreamGaussian's texture refinement (threed/guidance/sdedit.py): the renders in [-1, 1], the
        optimal denoiser's eps of the reference views of the cameras (rendered once, for every DDIM step), the
        map back to [0, 1] and the schedule's alphas_cumprod. `oracle_eps` of a zero image with noise
        x_t / sqrt(1 - abar) is the denoiser's eps at x_t: (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)."""
        background = background.detach().to(self.device)
        refs = torch.stack([self.render_reference(c, shading, background) for c in self.reference_cameras(cameras)],
                           dim=1).to(rgb.device, rgb.dtype) * 2.0 - 1.0

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            abar = self.alphas[t.to(self.device)].to(x_t.device)
            noise = x_t / (1.0 - abar).sqrt().view(-1, *([1] * (x_t.dim() - 1)))
            return oracle_eps(torch.zeros_like(x_t), refs, abar, noise)[0]

        return 2.0 * rgb - 1.0, eps_fn, lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), self.alphas

    def __call__(self, rgb: Tensor, cameras: Cameras, step: int, shading: str, background: Tensor, **_: object) -> dict:
        b = rgb.shape[0]
        if rgb.shape[1:3] != (cameras.height, cameras.width):
            raise ValueError(f"render {tuple(rgb.shape[1:3])} does not match the cameras' "
                             f"{(cameras.height, cameras.width)}")
        background = background.detach().to(self.device)
        refs = torch.stack([self.render_reference(c, shading, background) for c in self.reference_cameras(cameras)],
                           dim=1).to(rgb.dtype)  # (B, K, H, W, 3)
        if shading == "normal_latent":  # already in the latent's range: only brought to the latent's size
            x, refs = self._latent_size(rgb), self._latent_size(refs.flatten(0, 1)).unflatten(0, (b, -1))
        else:
            x, refs = 2.0 * rgb - 1.0, 2.0 * refs - 1.0
        t = sds.sample_timesteps(self.cfg, step, b, self.alphas.shape[0], self.generator)
        abar = self.alphas[t.to(self.device)].to(rgb.device)
        noise = torch.randn(x.shape, generator=self.generator).to(rgb.device, rgb.dtype)
        with torch.no_grad():
            eps_hat, weights = oracle_eps(x.detach(), refs.to(rgb.device), abar, noise)
        loss, grad = sds.sds_loss(x, eps_hat, noise, sds.weight(self.cfg.weighting, abar), self.cfg.grad_clip)
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(1).mean()
        return {
            "loss": loss,
            "t": float(t.float().mean()) / self.alphas.shape[0],
            "grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
            "posterior_entropy": float(entropy),
        }
