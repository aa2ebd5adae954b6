"""DreamFusion's scene: a hash-grid NeRF rendered by the volume renderer over a background."""

from __future__ import annotations

import torch
from torch import Tensor

from threed.cameras import Cameras
from threed.config import Config
from threed.errors import UserError, first_line
from threed.fields.nerf import NeRFField
from threed.render.background import Background
from threed.render.volume import RenderOutput, VolumeRenderer
from threed.schedule import Schedule
from threed.scenes import weight_used


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

    def param_groups(self) -> list[tuple[list[Tensor], Schedule]]:
        groups = [(list(self.field.parameters()), self.cfg.optim.lr)]
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
        self.renderer.update_occupancy(self.field, step, generator)

    def render(self, cameras: Cameras, shading: str, need_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutput:
        return self.renderer(self.field, self.background, cameras, shading, need_normals=need_normals,
                             generator=generator)

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        lc = self.losses
        opacity = out.opacity
        result: dict[str, Tensor] = {}
        if weight_used(lc, "opacity"):
            result["opacity"] = opacity.mean()
        if weight_used(lc, "sparsity"):  # ProlificDreamer's
            result["sparsity"] = (opacity ** 2 + 0.01).sqrt().mean()
        if weight_used(lc, "transmittance"):
            result["transmittance"] = -torch.clamp((1.0 - opacity).mean(), max=lc.transmittance_target(step))
        if weight_used(lc, "orient"):
            result["orient"] = out.orient
        if weight_used(lc, "entropy"):
            a = opacity.clamp(1e-5, 1 - 1e-5)
            result["entropy"] = -(a * torch.log(a) + (1 - a) * torch.log(1 - a)).mean()
        return result

    def state_dict(self) -> dict:
        return {"field": self.field.state_dict(), "background": self.background.state_dict(),
                "renderer": self.renderer.state_dict()}  # occupancy grid (either backend)

    def load_state_dict(self, state: dict) -> None:
        if "field" not in state:
            raise UserError("the checkpoint holds no NeRF field (a mesh-stage checkpoint?): pass a NeRF run's "
                            "checkpoints/step-*.pt")
        try:
            self.field.load_state_dict(state["field"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint does not match this field configuration ({first_line(e)})") from None
        self.background.load_state_dict(state["background"])
        try:
            self.renderer.load_state_dict(state.get("renderer", {}))
        except RuntimeError:  # saved by the other renderer backend: rebuild the grid from the field
            self.renderer.rebuild_occupancy(self.field)
