"""threestudio's zero123 normal smoothness: the 2-D term on the rendered normal map, the 3-D term on normals at
jittered sample positions (threed/render/volume.py, threed/scenes/nerf.py), their piecewise schedules
(threed/schedule.py), and the reference view's own regularisers (threed/scenes/reference.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from threed.cameras import make_cameras
from threed.config import build_config
from threed.errors import UserError
from threed.render.background import Background
from threed.render.volume import VolumeRenderer
from threed.schedule import Schedule
from threed.scenes.nerf import normal_map_smoothness


def test_a_constant_normal_map_is_smooth_and_a_checkerboard_costs_what_hand_arithmetic_says():
    flat = torch.tensor([0.2, 0.5, 0.9]).expand(2, 5, 7, 3)
    assert float(normal_map_smoothness(flat)) == 0.0
    # 2 x 2 checkerboard of 0 and 1 in every channel: each vertical and each horizontal neighbour differs by 1,
    # so each mean of squared differences is 1 and the term 2.
    board = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, :, :, None].expand(1, 2, 2, 3)
    assert float(normal_map_smoothness(board)) == pytest.approx(2.0)
    # a ramp along the width, 0.1 per pixel in channel 0 only, over 3 x 4 pixels: vertical differences 0;
    # horizontal 0.01 in one channel of three: mean 0.01 / 3.
    ramp = torch.zeros(1, 3, 4, 3)
    ramp[..., 0] = 0.1 * torch.arange(4.0)
    assert float(normal_map_smoothness(ramp)) == pytest.approx(0.01 / 3)


def test_piecewise_schedules_are_threestudio_s():
    """[100, 7.0, 5.0, 150, 10.0, 200] as threestudio's C() reads it: 7 to step 100, down to 5 at 150, up to 10
    at 200, 10 after (values by hand)."""
    s = Schedule.parse([100, 7.0, 5.0, 150, 10.0, 200], "loss.normal_smooth")
    assert [s(i) for i in (0, 100, 125, 150, 175, 200, 600)] == [7.0, 7.0, 6.0, 5.0, 7.5, 10.0, 10.0]
    assert s.bounds() == (5.0, 10.0) and not s.is_constant
    assert s.to_plain() == [100, 7.0, 5.0, 150, 10.0, 200]
    assert Schedule.parse(s.to_plain(), "x") == s
    with pytest.raises(UserError, match="each after the one before"):
        Schedule.parse([100, 7.0, 5.0, 150, 10.0, 120], "loss.normal_smooth")
    cfg = build_config("zero123")
    assert cfg.loss.normal_smooth(175) == 7.5 and cfg.loss.normal_smooth_3d(50) == 7.0


class HalfSpace(nn.Module):
    """Density 40 below the plane y = 0.1 (a soft step), so the normal is +y everywhere: a perfectly smooth
    surface. `bumps` adds a sine ripple in x to the plane's height, whose normals tilt from pixel to pixel."""

    def __init__(self, bumps: float = 0.0):
        super().__init__()
        self.bumps = bumps
        self.scale = nn.Parameter(torch.tensor(1.0))  # something for a gradient to reach
        self.training = True

    def height(self, x: Tensor) -> Tensor:
        return 0.1 + self.bumps * torch.sin(12.0 * x[..., 0])

    def density(self, x: Tensor) -> Tensor:
        return 40.0 * self.scale * torch.sigmoid(-60.0 * (x[..., 1] - self.height(x)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.density(x), torch.full_like(x, 0.5)

    def normal(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            grad = torch.autograd.grad(self.density(xg).sum(), xg, create_graph=True)[0]
        return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def render_from_above(field: HalfSpace) -> object:
    """A camera straight above (elevation 80), the plane filling its 12 x 12 view."""
    cfg = build_config(None, ["render.num_samples=64", "render.occupancy_resolution=0", "render.backend=torch"])
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cams = make_cameras(one(80.0), one(0.0), one(1.6), one(20.0), 12, 12)
    return VolumeRenderer(cfg.render, "cpu")(field, Background(cfg.render), cams, "albedo", normal_terms=True,
                                             generator=torch.Generator().manual_seed(0))


def test_a_flat_surface_has_no_smoothness_loss_and_a_bumpy_one_has_gradients():
    """The flat half-space: its normal map is (n + 1) / 2 = (0.5, 1, 0.5) at every pixel (opacity 1), so the 2-D
    term is 0 (1e-9: float noise) and so is the 3-D one. With a ripple both are positive and their sum's gradient
    reaches the field."""
    out = render_from_above(HalfSpace())
    assert float(out.opacity.detach().min()) > 0.999
    assert torch.allclose(out.normal, torch.tensor([0.5, 1.0, 0.5]).expand_as(out.normal), atol=1e-4)
    assert float(normal_map_smoothness(out.normal.detach())) < 1e-9 and float(out.normal_perturb.detach()) < 1e-4
    bumpy = HalfSpace(bumps=0.05)
    out = render_from_above(bumpy)
    smooth_2d, smooth_3d = normal_map_smoothness(out.normal), out.normal_perturb
    assert float(smooth_2d.detach()) > 1e-4 and float(smooth_3d.detach()) > 1e-3
    (smooth_2d + smooth_3d).backward()
    assert bumpy.scale.grad is not None and torch.isfinite(bumpy.scale.grad) and float(bumpy.scale.grad.abs()) > 0


def _disc(path: Path) -> Path:
    from test_zero123_run import _disc as disc  # tests/ is on sys.path (conftest.py)

    return disc(path)


def test_the_reference_view_gets_the_random_views_regularisers(tmp_path):
    """zero123-cpu (orient 1, entropy 0.5, both normal-smoothness terms): the reference render adds ref_orient,
    ref_entropy, ref_normal_smooth and ref_normal_smooth_3d, weighted as the random views' terms, and no
    sparsity (threestudio's reference substep); image.regularise=false weighs them 0 (so they are not computed)."""
    from threed.scenes.reference import ReferenceLosses, ReferenceViewNeRFScene

    image = _disc(tmp_path / "disc.png")
    cfg = build_config("zero123-cpu", [f"image.path={image}", "device=cpu", "image.sizes=[[0, 16]]",
                                       "render.num_samples=24", "field.n_levels=4", "field.log2_hashmap_size=12"])
    torch.manual_seed(0)
    scene = ReferenceViewNeRFScene(cfg, "cpu")
    scene.train()
    generator = torch.Generator().manual_seed(0)
    scene.prepare(0, generator)
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    out = scene.render(make_cameras(one(10.0), one(40.0), one(3.8), one(20.0), 16, 16), "albedo", True, generator)
    losses = scene.regularisers(out, 175)
    own = {"ref_orient", "ref_entropy", "ref_normal_smooth", "ref_normal_smooth_3d"}
    assert {"rgb", "mask", "orient", "entropy", "sparsity", "normal_smooth", "normal_smooth_3d"} <= set(losses)
    assert "ref_sparsity" not in losses
    assert own <= set(losses) and all(torch.isfinite(losses[k]) for k in own)
    assert scene.losses.ref_normal_smooth(60) == cfg.loss.normal_smooth(60) == 10.0
    total = sum(getattr(scene.losses, k)(175) * v for k, v in losses.items())
    total.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in scene.field.parameters())
    cfg.image.regularise = False
    off = ReferenceLosses(cfg.loss, cfg.image)
    assert all(getattr(off, k).bounds() == (0.0, 0.0) for k in own) and off.orient(0) == 1.0
