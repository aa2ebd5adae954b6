"""DreamFusion's scene: a hash-grid NeRF rendered by the volume renderer over a background."""

from __future__ import annotations

import torch
from torch import Tensor

from threed.cameras import Cameras, make_cameras
from threed.config import Config
from threed.errors import UserError, first_line
from threed.fields.nerf import NeRFField
from threed.mesh import auto_threshold, density_grid, extract_mesh
from threed.render.background import Background
from threed.render.shading import pick_shading
from threed.render.volume import RenderOutput, VolumeRenderer
from threed.schedule import Schedule
from threed.scenes import ExportedMesh, field_groups, render_each, weight_used


def silhouette_cameras(cfg: Config, size: int) -> Cameras:
    """Views for choosing the marching-cubes level: an orbit at the evaluation elevation, plus above and
    below."""
    cam = cfg.camera
    el = [cam.eval_elevation] * 6 + [60.0, -30.0]
    az = [i * 60.0 for i in range(6)] + [30.0, 210.0]
    n = len(el)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(torch.tensor(el), torch.tensor(az), full(cam.eval_distance), full(cam.eval_fovy),
                        size, size)


def normal_map_smoothness(normal: Tensor) -> Tensor:
    """threestudio's 2-D normal smoothness of normal maps (B, H, W, 3): the mean squared difference of vertical
    neighbours plus that of horizontal neighbours."""
    return ((normal[:, 1:] - normal[:, :-1]).square().mean()
            + (normal[:, :, 1:] - normal[:, :, :-1]).square().mean())


class NeRFScene:
    """Field (density + albedo), background and volume renderer; the regularisers act on rendered opacity
    and the orientation penalty (cfg.loss)."""

    def __init__(self, cfg: Config, device: torch.device | str):
        self.cfg = cfg
        self.device = torch.device(device)
        self.field = NeRFField(cfg.field, cfg.render.bound, self.device)
        self.background = Background(cfg.render).to(self.device)
        self.renderer = VolumeRenderer(cfg.render, self.device)
        self.losses = cfg.loss

    @classmethod
    def from_state(cls, cfg: Config, state: dict, device: torch.device | str) -> "NeRFScene":
        """The scene a NeRF-stage checkpoint holds."""
        scene = cls(cfg, device)
        scene.load_state_dict(state)
        return scene

    def param_groups(self) -> list[tuple[list[Tensor], Schedule]]:
        """The field (one group, or its grid and MLP: optim.lr_mlp), then the background if it learns."""
        groups = field_groups(self.field, self.cfg.optim.lr, self.cfg.optim.lr_mlp)
        bg_params = list(self.background.parameters())
        if bg_params:
            groups.append((bg_params, self.cfg.optim.lr_background))
        return groups

    def describe(self) -> str:
        """Which backends were chosen, and why a CUDA run is not using an accelerator."""
        field, renderer = self.field.backend, self.renderer.backend
        if self.device.type == "cuda":
            if field == "triton" and self.cfg.field.backend == "auto":
                field += " (tinycudann not importable)"
            if field == "torch" and self.cfg.field.backend == "auto":
                field += " (tinycudann and triton not importable)"
            if renderer == "torch" and self.cfg.render.backend == "auto":
                renderer += " (nerfacc not importable)"
        if field.startswith("triton") and self.cfg.field.normals == "analytic":
            field += " (analytic normals: PyTorch path, the kernels have no d/dx)"
        return f"field backend: {field} | renderer: {renderer}"

    def train(self) -> None:
        self.field.train()
        self.background.train()

    def eval(self) -> None:
        self.field.eval()
        self.background.eval()

    def prepare(self, step: int, generator: torch.Generator | None = None) -> None:
        self.set_step(step)
        self.renderer.update_occupancy(self.field, step, generator)

    def set_step(self, step: int) -> None:
        """The field as it is at training step `step` (its progressive levels); also on resume, for export."""
        self.field.set_step(step)

    def pick_shading(self, step: int, generator: torch.Generator) -> str:
        r = self.cfg.render
        return pick_shading(r.shading, step, r.albedo_only_steps, r.textureless_prob, generator, r.albedo_prob)

    def render(self, cameras: Cameras, shading: str, need_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutput:
        """A render of `cameras`; a training render (field in training mode, autograd on) also gives the normal
        map and the perturbed-normal difference where the normal-smoothness losses have weight."""
        return self.renderer(self.field, self.background, cameras, shading, need_normals=need_normals,
                             generator=generator, normal_terms=self.wants_normal_terms())

    def wants_normal_terms(self) -> bool:
        return (self.field.training and torch.is_grad_enabled()
                and (weight_used(self.losses, "normal_smooth") or weight_used(self.losses, "normal_smooth_3d")))

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        lc = self.losses
        opacity = out.opacity
        result: dict[str, Tensor] = {}
        if weight_used(lc, "opacity"):
            result["opacity"] = opacity.mean()
        if weight_used(lc, "sparsity"):  # threestudio's
            result["sparsity"] = (opacity ** 2 + 0.01).sqrt().mean()
        if weight_used(lc, "transmittance"):
            result["transmittance"] = -torch.clamp((1.0 - opacity).mean(), max=lc.transmittance_target(step))
        if weight_used(lc, "orient"):
            result["orient"] = out.orient
        if weight_used(lc, "entropy"):
            a = opacity.clamp(1e-5, 1 - 1e-5)
            result["entropy"] = -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()
        if weight_used(lc, "normal_smooth") and out.normal is not None:
            result["normal_smooth"] = normal_map_smoothness(out.normal)
        if weight_used(lc, "normal_smooth_3d") and out.normal_perturb is not None:
            result["normal_smooth_3d"] = out.normal_perturb
        return result

    def state_dict(self) -> dict:
        return {"field": self.field.state_dict(), "background": self.background.state_dict(),
                "renderer": self.renderer.state_dict()}  # occupancy grid (either backend)

    def load_state_dict(self, state: dict) -> None:
        if "field" not in state:
            raise UserError("the checkpoint holds no NeRF field (a mesh-stage checkpoint?): pass a NeRF stage's "
                            "checkpoints/nerf/step-*.pt")
        try:
            self.field.load_state_dict(state["field"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint does not match this field configuration ({first_line(e)})") from None
        self.background.load_state_dict(state["background"])
        try:
            self.renderer.load_state_dict(state.get("renderer", {}))
        except RuntimeError:  # saved by the other renderer backend: rebuild the grid from the field
            self.renderer.rebuild_occupancy(self.field)

    # -- export -----------------------------------------------------------------------------------------
    def _silhouette_cameras(self, size: int) -> Cameras:
        return silhouette_cameras(self.cfg, size)

    @torch.no_grad()
    def export_mesh(self, resolution: int | None = None, threshold: float | None = None,
                    progress: bool | None = False) -> ExportedMesh:
        """Marching cubes of the density at `resolution` (default export.resolution), at `threshold` or, by
        default, at the level whose silhouettes agree best with the rendered opacity. Uses only the field as it
        is (trained or not): a run exported at step 0 gives the initial blob."""
        cfg = self.cfg
        res = resolution or cfg.export.resolution
        bound = cfg.render.bound
        grid = density_grid(self.field.density, bound, res, self.device, progress=progress)
        given = cfg.export.threshold if threshold is None else threshold
        level = given
        if level < 0:
            cams = self._silhouette_cameras(64)
            _, opacity = render_each(self, cams, "albedo", self.device, progress, "mesh level: silhouettes")
            rays_o, rays_d = cams.rays()
            level = auto_threshold(grid, bound, rays_o, rays_d, torch.from_numpy(opacity), progress=progress)
        mesh = extract_mesh(self.field.density, self.field.albedo, bound, res, level, cfg.export.keep_components,
                            cfg.export.decimate_faces, device=self.device, grid=grid, progress=progress)
        about = {"threshold": float(level), "threshold_chosen": "given" if given >= 0 else "auto",
                 "resolution": int(res), "bound": float(bound)}
        # a texture reads half a marching-cubes cell inside, as the vertex colours are (threed.mesh.extract_mesh)
        return ExportedMesh(mesh, about, self.field.albedo, inset=bound / (res - 1))
