"""Scenes: what a training stage optimises and how it is rendered.

The training loop (threed/trainer.py) is the same for every stage; a scene plugs into it with
- `param_groups()`: [(parameters, learning-rate schedule), ...], one Adam group each;
- `prepare(step, generator)`: per-step upkeep before rendering (e.g. the NeRF's occupancy grid);
- `render(cameras, shading, need_normals, generator) -> RenderOutput` (rgb, opacity, depth, background,
  orient), what the guidance reads;
- `losses`: the loss-weight schedules (a dataclass with `guidance` and one field per regulariser), and
  `regularisers(out, step) -> {name: value}` for the ones whose weight is ever non-zero;
- `state_dict()` / `load_state_dict(state)`: its part of a checkpoint (top-level keys);
- `train()` / `eval()` and `describe()` (the backends chosen, for the run's first line).

`nerf.NeRFScene` is DreamFusion's hash-grid NeRF + volume renderer + background; `mesh.MeshScene` is
Magic3D's fine stage: a DMTet surface + texture field + rasterizer + background.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from threed.cameras import Cameras
    from threed.render.volume import RenderOutput
    from threed.schedule import Schedule


class Scene(Protocol):
    """What the training loop needs of a stage's scene (see the module docstring)."""

    losses: Any
    background: Any

    def param_groups(self) -> list[tuple[list[Tensor], Schedule]]: ...

    def prepare(self, step: int, generator: torch.Generator | None = None) -> None: ...

    def render(self, cameras: Cameras, shading: str, need_normals: bool = False,
               generator: torch.Generator | None = None) -> RenderOutput: ...

    def regularisers(self, out: RenderOutput, step: int) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def describe(self) -> str: ...


def weight_used(losses: Any, name: str) -> bool:
    """Whether the loss `name` has a weight schedule in `losses` that is ever non-zero."""
    schedule = getattr(losses, name, None)
    return schedule is not None and schedule.bounds()[1] > 0
