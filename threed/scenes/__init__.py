"""Scenes: what a training stage optimises and how it is rendered.

The training loop (threed/trainer.py) is the same for every stage; a scene plugs into it with
- `param_groups()`: [(parameters, learning-rate schedule), ...], one optimiser group each (optim.optimizer);
- `prepare(step, generator)`: per-step upkeep before rendering (e.g. the NeRF's occupancy grid);
- `pick_shading(step, generator)`: the step's shading mode, from the scene's own settings (render.* for the
  NeRF, mesh.* for the mesh stage);
- `render(cameras, shading, need_normals, generator) -> RenderOutput` (rgb, opacity, depth, background,
  orient), what the guidance reads;
- `losses`: the loss-weight schedules (a dataclass with `guidance` and one field per regulariser), and
  `regularisers(out, step) -> {name: value}` for the ones whose weight is ever non-zero;
- `state_dict()` / `load_state_dict(state)`: its part of a checkpoint (top-level keys);
- `train()` / `eval()` and `describe()` (the backends chosen, for the run's first line);
- `export_mesh(resolution, threshold, progress) -> ExportedMesh`: its surface as a mesh, with the albedo
  function a texture is baked from (threed/export.py writes the files; no exporter switches on the scene).
- optionally `render_size(step) -> (width, height)` of the training renders (default: render.size(step)), and
  `after_step(step, optimizer, generator)`: upkeep after the optimiser's step numbered `step`
  (from 1), which may add or remove parameter rows and their optimiser state (the Gaussians' densification).

`nerf.NeRFScene` is DreamFusion's hash-grid NeRF + volume renderer + background; `mesh.MeshScene` is
Magic3D's fine stage: a DMTet surface + texture field + rasterizer + background; `gaussians.GaussianScene`
is DreamGaussian's 3D Gaussians + splatting rasterizer + background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch

from threed.config import same_as_lr
from threed.progress import bar

if TYPE_CHECKING:
    from torch import Tensor

    from threed.cameras import Cameras
    from threed.mesh import Mesh
    from threed.render.volume import RenderOutput
    from threed.schedule import Schedule


@dataclass
class ExportedMesh:
    """A scene's surface as exported: the mesh (vertex colours = albedo), facts for mesh.json (`about`), and
    the albedo function a baked texture reads, `inset` scene units inside the surface. A physically based
    material (Fantasia3D's) also gives `material`: points (N, 3) -> (N, 5) albedo, roughness, metallic, baked
    into albedo and metallic-roughness textures."""

    mesh: Mesh
    about: dict
    albedo: Callable[[Tensor], Tensor]
    inset: float = 0.0
    material: Callable[[Tensor], Tensor] | None = None


class Scene(Protocol):
    """What the training loop needs of a stage's scene (see the module docstring)."""

    losses: Any
    background: Any

    def param_groups(self) -> list[tuple[list[Tensor], Schedule]]: ...

    def prepare(self, step: int, generator: torch.Generator | None = None) -> None: ...

    def pick_shading(self, step: int, generator: torch.Generator) -> str: ...

    def render(self, cameras: Cameras, shading: str, need_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutput: ...

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def describe(self) -> str: ...

    def export_mesh(self, resolution: int | None = None, threshold: float | None = None,
                    progress: bool | None = False) -> ExportedMesh: ...


def field_groups(field: Any, lr: Schedule, lr_mlp: Schedule) -> list[tuple[list[Tensor], Schedule]]:
    """A NeRF field's optimiser groups: all of it at `lr`, or, when `lr_mlp` is set (see config.same_as_lr),
    its hash grid at `lr` and its MLP at `lr_mlp` (threestudio's ProlificDreamer: 0.01 and 0.001)."""
    if same_as_lr(lr_mlp):
        return [(list(field.parameters()), lr)]
    return [(list(field.encoding.parameters()), lr), (list(field.mlp.parameters()), lr_mlp)]


def weight_used(losses: Any, name: str) -> bool:
    """Whether the loss `name` has a weight schedule in `losses` that is ever non-zero."""
    schedule = getattr(losses, name, None)
    return schedule is not None and schedule.bounds()[1] > 0


@torch.no_grad()
def render_each(scene: Scene, cameras: Cameras, shading: str, device: torch.device | str,
                progress: bool | None = False, desc: str = "rendering") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (B,H,W,3), opacity float (B,H,W)) rendered one camera at a time (memory of one view);
    `progress` shows a bar named `desc` over the views."""
    images, opacity = [], []
    with bar(desc, len(cameras), progress, unit="view") as shown:
        for i in range(len(cameras)):
            out = scene.render(cameras.subset(i).to(device), shading)
            images.append((out.rgb[0].clamp(0, 1) * 255).round().byte().cpu().numpy())
            opacity.append(out.opacity[0, ..., 0].float().cpu().numpy())
            shown.update(1)
    return np.stack(images), np.stack(opacity)
