"""Magic3D's fine-stage scene: a DMTet surface, textured by a field, rasterized at high resolution.

Magic3D (Lin et al. 2023) refines the coarse NeRF as an explicit mesh: the surface is the zero level set of
an SDF on a deformable tetrahedral grid (threed/fields/dmtet.py), extracted by marching tetrahedra every step
so its vertices are differentiable in the SDF and offsets; it is rasterized (threed/render/rasterize.py,
nvdiffrast's split: visibility without gradients, differentiable interpolation, antialiasing for silhouette
gradients), shaded like the NeRF (threed/render/shading.py) with the mesh's interpolated vertex normals
(with mesh.soft_shading, Magic3D's random ambient / diffuse split per training render), and composited over
the background. The run's guidance scores the renders (Magic3D: SDS; ProlificDreamer: VSD),
so a 512² render costs little more than a 64² one in the guidance: the VAE encodes at 512 either way.

Starting point (`from_coarse`): the SDF is the coarse density's surface at the level the coarse export
chose (`DMTetGeometry.from_density`, on a grid fitted to the object's box, blurred by `start_smoothing`
cells), and the texture field is a copy of the coarse NeRF field (hash grid + MLP), read through its albedo
head: the fine stage inherits the coarse colours exactly (threestudio's `inherit_texture`), then optimises
them on the surface. The background is the coarse one, trained at `mesh.lr_background` (0: frozen).
threestudio trains it when refining: its Magic3D refine stage optimises every parameter, the background
included, at 0.01, its ProlificDreamer texture stage the background at 0.001; so do the magic3d preset's
mesh stage and prolificdreamer's texture stage.

Fantasia3D's stages use the same scene: its geometry stage starts from a sphere or a guide mesh (`from_shape`,
threed/fields/sdf_init.py), its SDF a hash-grid network's (`geometry.sdf_network`, threed/fields/neural_sdf.py),
and scores normal maps (`shading: normal`), for its first `latent_steps` steps as
the 64² normal-and-mask image standing in for the latent (`normal_latent`); its appearance stage keeps that
surface (`from_geometry`) and trains a material field (threed/fields/material.py) shaded by split-sum
image-based lighting (`shading: pbr`, threed/render/ibl.py), exported as a PBR material.

Image rows: the rasterizer's row 0 is the bottom of the view (NDC y = -1); renders are flipped to the
top-row-first convention of `Cameras.rays()` before they leave `render`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threed.cameras import Cameras
from threed.config import Config
from threed.errors import Diverged, UserError, first_line
from threed.fields.dmtet import DMTetGeometry
from threed.fields.material import MaterialField
from threed.fields.neural_sdf import NeuralDMTetGeometry, geometry_from_state
from threed.fields.nerf import NeRFField
from threed.mesh import Mesh, clean_mesh, keep_large_components, vertex_normals as np_vertex_normals
from threed.mesh_losses import laplacian_smoothing, normal_consistency
from threed.render.background import Background
from threed.render.rasterize import MeshRasterizer, edge_topology
from threed.render.shading import pick_shading, shade, soft_ambient
from threed.render.volume import RenderOutput
from threed.schedule import Schedule
from threed.scenes import ExportedMesh, field_groups, weight_used

NEAR, FAR = 0.05, 100.0  # clip planes (scene units); objects sit in [-bound, bound]^3 at distance ~1.5-2


class EmptySurface(Diverged):
    """The SDF has no zero crossing: there is no surface to render."""


def texture_field(cfg: Config, device: torch.device | str) -> NeRFField | MaterialField:
    """The field a mesh stage colours its surface with: a material (albedo, roughness, metallic) where it
    shades physically based (`pbr`), else a NeRF-shaped texture field read through its albedo."""
    m = cfg.mesh
    if m.shading == "pbr":
        return MaterialField(cfg.field, cfg.render.bound, tuple(getattr(m, "roughness", (0.08, 0.9))),
                             tuple(getattr(m, "metallic", (0.0, 0.9))), device)
    return NeRFField(cfg.field, cfg.render.bound, device)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """(V, 3) unit normals, the area-weighted mean of the adjacent faces' normals (differentiable)."""
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    cross = torch.cross(v1 - v0, v2 - v0, dim=-1)  # 2 * area * normal
    acc = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), cross.repeat_interleave(3, dim=0))
    return F.normalize(acc, dim=-1, eps=1e-20)


class MeshScene:
    """DMTet geometry + texture field + rasterizer + background (see the module docstring)."""

    def __init__(self, cfg: Config, geometry: DMTetGeometry, texture: NeRFField, background: Background,
                 device: torch.device | str):
        self.cfg = cfg
        self.device = torch.device(device)
        self.geometry = geometry.to(self.device)
        self.texture = texture.to(self.device)
        self.background = background.to(self.device)
        self.background.random_aug = cfg.mesh.random_aug  # this stage's, not the NeRF stage's render.random_aug
        self.rasterizer = MeshRasterizer(cfg.mesh.rasterizer, self.device)
        self.losses = cfg.mesh.loss
        self.profile = False  # time the parts of `render` (synchronising the device) into `timings`
        self.timings: dict[str, float] = {}
        self._mesh: tuple[Tensor, Tensor] | None = None  # the last render's surface, for the regularisers
        self._light = None  # the prefiltered environment of `pbr` shading, built at its first render

    @property
    def renderer(self) -> MeshRasterizer:
        return self.rasterizer

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_coarse(cls, cfg: Config, field: NeRFField, background: Background, level: float,
                    device: torch.device | str, progress: bool = True) -> "MeshScene":
        """The fine stage's start from a coarse NeRF: surface at density `level`, texture = copy of `field`."""
        m = cfg.mesh
        field.eval()
        geometry = DMTetGeometry.from_density(field.density, level, bound=cfg.render.bound, resolution=m.resolution,
                                              keep_components=cfg.export.keep_components, device=device,
                                              progress=progress, deform=m.deform_scale > 0,
                                              deform_scale=m.deform_scale, smoothing=m.start_smoothing)
        texture = NeRFField(cfg.field, cfg.render.bound, device)
        texture.load_state_dict(field.state_dict())
        bg = Background(cfg.render).to(device)
        bg.take_from(background.state_dict())
        return cls(cfg, geometry, texture, bg, device)

    @classmethod
    def from_shape(cls, cfg: Config, device: torch.device | str) -> "MeshScene":
        """A geometry stage's start with no NeRF before it (Fantasia3D): the SDF of `mesh.init` (a sphere or a
        guide mesh, threed/fields/sdf_init.py) on a grid of `mesh.resolution` cells across the scene's cube."""
        from threed.fields.sdf_init import initial_sdf
        from threed.fields.tetgrid import TetGrid

        m = cfg.mesh
        grid = TetGrid.cube(m.resolution, cfg.render.bound)
        if getattr(m, "sdf_network", False):
            geometry = NeuralDMTetGeometry(grid, cfg.field, cfg.render.bound, deform=m.deform_scale > 0,
                                           deform_scale=m.deform_scale, refresh=m.sdf_network_refresh, device=device)
        else:
            geometry = DMTetGeometry(grid, deform=m.deform_scale > 0, deform_scale=m.deform_scale, device=device)
        geometry.set_sdf(initial_sdf(m.init, grid, cfg.render.bound, device))
        return cls(cfg, geometry, texture_field(cfg, device), Background(cfg.render), device)

    @classmethod
    def from_geometry(cls, cfg: Config, state: dict, device: torch.device | str) -> "MeshScene":
        """A stage that keeps an earlier stage's surface (its checkpoint `state`'s geometry, copied) with a
        fresh texture field and background of its own (Fantasia3D's appearance stage)."""
        geometry = geometry_from_state(state["geometry"], device, cfg.field, cfg.render.bound, cfg.mesh.deform_scale)
        return cls(cfg, geometry, texture_field(cfg, device), Background(cfg.render), device)

    @classmethod
    def from_state(cls, cfg: Config, state: dict, device: torch.device | str) -> "MeshScene":
        """The scene a mesh-stage checkpoint holds (its tetrahedral grid included)."""
        if "geometry" not in state:
            raise UserError("the checkpoint holds no mesh-stage geometry: pass a checkpoints/mesh/step-*.pt file")
        geometry = geometry_from_state(state["geometry"], device, cfg.field, cfg.render.bound, cfg.mesh.deform_scale,
                                       getattr(cfg.mesh, "sdf_network_refresh", 1))
        scene = cls(cfg, geometry, texture_field(cfg, device), Background(cfg.render), device)
        scene.load_state_dict(state)
        return scene

    # -- the Scene interface (threed/scenes/__init__.py) ----------------------------------------------
    def param_groups(self) -> list[tuple[list[Tensor], Schedule]]:
        """SDF, deformation, texture (one group, or its grid and MLP: mesh.lr_texture_mlp) and background, each
        with its schedule; a part whose learning rate is zero throughout is frozen (no group, no gradient)."""
        m = self.cfg.mesh
        groups_of = self.geometry.optim_groups()
        parts: list[tuple[list[Tensor], Schedule]] = [(groups_of["sdf"], m.lr_sdf)]
        if "deformation" in groups_of:
            parts.append((groups_of["deformation"], m.lr_deformation))
        parts += field_groups(self.texture, m.lr_texture, m.lr_texture_mlp)
        bg_params = list(self.background.parameters())
        if bg_params:
            parts.append((bg_params, m.lr_background))
        groups = []
        for params, schedule in parts:
            if schedule.bounds()[1] > 0:
                groups.append((params, schedule))
            else:
                for p in params:
                    p.requires_grad_(False)
        if not groups:
            raise UserError("every mesh-stage learning rate is 0 (mesh.lr_sdf, lr_deformation, lr_texture, "
                            "lr_background): set one above 0")
        return groups

    def describe(self) -> str:
        cells = "x".join(str(c) for c in self.geometry.grid.cells)
        raster = self.rasterizer.backend
        if self.device.type == "cuda" and raster == "torch" and self.cfg.mesh.rasterizer == "auto":
            raster += " (nvdiffrast not importable)"
        return (f"mesh rasterizer: {raster} | tetrahedral grid: {cells} cells | texture field backend: "
                f"{self.texture.backend}")

    def train(self) -> None:
        self.texture.train()
        self.background.train()

    def eval(self) -> None:
        self.texture.eval()
        self.background.eval()

    def prepare(self, step: int, generator: torch.Generator | None = None) -> None:
        pass

    def pick_shading(self, step: int, generator: torch.Generator) -> str:
        m = self.cfg.mesh
        if m.shading == "normal" and step < getattr(m, "latent_steps", 0):
            return "normal_latent"  # Fantasia3D's warm-up: the normal map and mask as the latent
        return pick_shading(m.shading, step, m.albedo_only_steps, m.textureless_prob, generator, m.albedo_prob)

    def environment(self):
        """The prefiltered environment light of `pbr` shading (mesh.env_map times mesh.env_scale; cached)."""
        if self._light is None:
            from threed.render.ibl import brdf_lut, environment_light

            m = self.cfg.mesh
            self._light = (environment_light(getattr(m, "env_map", ""), getattr(m, "env_scale", 2.0),
                                             device=self.device), brdf_lut(device=self.device))
        return self._light

    def _tick(self, name: str, start: float) -> float:
        if not self.profile:
            return start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - start
        return now

    def render(self, cameras: Cameras, shading: str, need_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutput:
        """Render every camera: (B, H, W, *) images like the volume renderer's, rows top first; with
        `need_normals`, the normal map too (RenderOutput.normal)."""
        self.timings = {}
        t = time.perf_counter()
        vertices, faces = self.geometry.extract()
        if faces.shape[0] == 0:
            raise EmptySurface("the mesh stage's surface vanished (the SDF has no zero crossing)")
        if self.cfg.mesh.keep_components > 0:  # outliers out of the render (one host sync)
            kept = keep_large_components(faces.cpu().numpy(), vertices.shape[0], self.cfg.mesh.keep_components)
            faces = torch.from_numpy(kept).to(faces.device)
        self._mesh = (vertices, faces)
        t = self._tick("extract", t)
        b, h, w = len(cameras), cameras.height, cameras.width
        homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=-1)
        pos = torch.einsum("bij,vj->bvi", cameras.clip_matrices(NEAR, FAR).to(vertices.dtype), homogeneous)
        rast = self.rasterizer.rasterize(pos, faces, (h, w))
        attrs = torch.cat([vertices, vertex_normals(vertices, faces)], dim=-1)[None]
        surface = self.rasterizer.interpolate(attrs, rast, faces)  # (B, H, W, 6): position, normal
        t = self._tick("rasterize", t)
        hit = rast[..., 3] > 0  # (B, H, W), rows bottom first
        points = surface[..., :3][hit]
        latent = shading == "normal_latent"
        mode = "normal" if latent else shading
        rays_o, rays_d = cameras.rays()
        if mode in ("textureless", "normal"):
            albedo = points.new_ones(points.shape[0], 3)  # shade() uses the lighting or the normal alone
        elif mode == "pbr":
            material = self.texture.material(points)
            albedo = material[:, :3]
        else:
            albedo = self.texture.albedo(points)
        normal = light = None
        if mode != "albedo":
            normal = F.normalize(surface[..., 3:][hit], dim=-1, eps=1e-20)
            light = cameras.light_position[:, None, None, :].expand(b, h, w, 3)[hit]
        ambient = self.cfg.render.ambient
        if self.cfg.mesh.soft_shading and self.texture.training and mode in ("lambertian", "textureless"):
            ambient = soft_ambient(generator)
        if mode == "pbr":
            from threed.render.ibl import shade_pbr

            env, lut = self.environment()
            view = F.normalize(rays_d.flip(1)[hit], dim=-1)
            color = shade_pbr(env, lut, albedo, material[:, 3:4], material[:, 4:5], normal, view).clamp(0.0, 1.0)
        else:
            color = shade(albedo, normal, points, light, mode, ambient)
        if latent:  # Fantasia3D's latent: the normal in [-1, 1] over -1, and the mask
            color = color * 2.0 - 1.0
        t = self._tick("texture", t)
        # rows top first; normal maps lie over black, as threestudio renders them for the prior
        bg = torch.zeros_like(rays_d) if mode == "normal" else self.background(rays_d, generator)
        if latent:
            bg = bg - 1.0
        composite = torch.where(hit[..., None], surface.new_zeros(b, h, w, 3).index_put((hit,), color), bg.flip(1))
        distance = (points - rays_o.flip(1)[hit]).norm(dim=-1)
        depth = surface.new_zeros(b, h, w).index_put((hit,), distance)[..., None]
        topology = edge_topology(faces, vertices.shape[0]) if self.rasterizer.backend == "torch" else None
        image = torch.cat([composite, hit[..., None].to(composite.dtype)], dim=-1)
        image = self.rasterizer.antialias(image.contiguous(), rast, pos, faces, topology)
        self._tick("antialias", t)
        rgb, opacity = image[..., :3].flip(1), image[..., 3:].flip(1)
        if latent:  # four channels, as threestudio's Fantasia3D feeds them to the prior (its rgb_as_latents)
            rgb = torch.cat([rgb, opacity], dim=-1)
        normal_map = None
        if need_normals:  # as the volume renderer's: the unit normal mapped to [0, 1] where seen, zero elsewhere
            normal_map = ((F.normalize(surface[..., 3:], dim=-1, eps=1e-20) + 1.0) / 2.0 * hit[..., None]).flip(1)
        return RenderOutput(rgb, opacity, depth.flip(1), bg, rgb.new_zeros(()), normal=normal_map)

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        """Smoothness of the surface last rendered, and DMTet's sign-flip term (see threed/mesh_losses.py)."""
        assert self._mesh is not None, "render before asking for the regularisers"
        vertices, faces = self._mesh
        lc = self.losses
        result: dict[str, Tensor] = {}
        if weight_used(lc, "normal_consistency"):
            result["normal_consistency"] = normal_consistency(vertices, faces)
        if weight_used(lc, "laplacian"):
            result["laplacian"] = laplacian_smoothing(vertices, faces)
        if weight_used(lc, "sign_flip"):
            result["sign_flip"] = self.geometry.sign_flip_loss()
        return result

    def state_dict(self) -> dict:
        return {"geometry": self.geometry.state_dict(), "texture": self.texture.state_dict(),
                "background": self.background.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "geometry" not in state:
            raise UserError("the checkpoint holds no mesh-stage geometry: pass a checkpoints/mesh/step-*.pt file")
        try:
            self.geometry.load_state_dict(state["geometry"])
            self.texture.load_state_dict(state["texture"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint does not match this mesh-stage configuration ({first_line(e)})") from None
        self.background.take_from(state["background"])

    # -- export -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_mesh(self, resolution: int | None = None, threshold: float | None = None,
                    progress: bool | None = False) -> ExportedMesh:
        """The current surface with vertex albedo from the texture field, cleaned like the NeRF export
        (components under export.keep_components dropped, optional decimation to export.decimate_faces). The
        texture field is trained on the surface itself, so a baked texture reads it there (no inset)."""
        if resolution is not None or threshold is not None:
            raise UserError("--resolution and --threshold set a NeRF's marching cubes; this run's mesh comes from "
                            "its mesh stage (DMTet): drop them")
        keep_components, decimate_faces = self.cfg.export.keep_components, self.cfg.export.decimate_faces
        vertices, faces = self.geometry.extract()
        if faces.shape[0] == 0:
            raise EmptySurface("the mesh stage's surface is empty (the SDF has no zero crossing): resume from an "
                               "earlier checkpoint or lower mesh.lr_sdf")
        v, f = clean_mesh(vertices.float().cpu().numpy(), faces.cpu().numpy(), keep_components, decimate_faces)
        colors = []
        for start in range(0, len(v), 65536):
            points = torch.from_numpy(v[start:start + 65536]).to(self.device)
            colors.append(self.texture.albedo(points).float().clamp(0, 1).cpu().numpy())
        colors_np = np.concatenate(colors) if colors else np.zeros((0, 3), np.float32)
        mesh = Mesh(vertices=v, faces=f, colors=colors_np, normals=np_vertex_normals(v, f))
        material = self.texture.material if isinstance(self.texture, MaterialField) else None
        return ExportedMesh(mesh, {"tet_grid_cells": list(self.geometry.grid.cells)}, self.texture.albedo,
                            material=material)
