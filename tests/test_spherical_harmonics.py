"""View-dependent colour of the Gaussians (threed/render/spherical_harmonics.py, `gaussians.sh_degree`): the basis
is orthonormal and is gsplat's (3DGS's order and signs), a render from threed's rasterizer equals gsplat's own
`rasterization(sh_degree=...)` (the direction from the camera to the Gaussian included), degree 0 is the
colour the Gaussians always had, a view-dependent colour is learnt where degree 0 cannot learn it, and the
Gaussian scene switches the degrees on as 3DGS does and keeps them through densification, the .ply and
checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from exporters.splat_ply import read_splat_ply
from threed.cameras import make_cameras
from threed.config import build_config
from threed.fields.gaussians import Gaussians
from threed.render import splat, splat_gsplat
from threed.render.spherical_harmonics import coefficients, sh_basis, sh_to_rgb
from threed.render.splat import sh0_to_rgb
from threed.scenes.gaussians import GaussianScene


def _sphere_points(n: int) -> torch.Tensor:
    """n nearly evenly spaced unit vectors (a Fibonacci lattice), float64."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5 ** 0.5) * i
    r = (1 - z * z).sqrt()
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)


def test_the_basis_is_orthonormal_on_the_sphere() -> None:
    """4π mean(Y_i Y_j) over 20000 evenly spread directions: the identity within 1e-3 (16 functions)."""
    y = sh_basis(_sphere_points(20000), 3)
    gram = 4 * math.pi * (y.T @ y) / y.shape[0]
    assert float((gram - torch.eye(16, dtype=torch.float64)).abs().max()) < 1e-3


def test_the_basis_is_gsplats_reference() -> None:
    reference = pytest.importorskip("gsplat.cuda._torch_impl")
    dirs = torch.nn.functional.normalize(torch.randn(500, 3, generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.float64), dim=-1)
    for degree in range(4):
        ours = sh_basis(dirs, degree)
        assert ours.shape == (500, (degree + 1) ** 2)
        assert torch.allclose(ours, reference._eval_sh_bases_fast((degree + 1) ** 2, dirs), atol=1e-14)


def test_degree_zero_is_the_old_colour_and_only_the_degrees_in_use_count() -> None:
    g = torch.Generator().manual_seed(1)
    f_dc, f_rest = torch.randn(20, 3, generator=g) * 3, torch.randn(20, 15, 3, generator=g)
    dirs = torch.randn(2, 20, 3, generator=g)
    assert torch.equal(sh_to_rgb(f_dc, f_rest, dirs, 0), sh0_to_rgb(f_dc).expand(2, 20, 3))
    assert float(sh0_to_rgb(f_dc).min()) == 0.0  # clamped below at 0, as 3DGS does
    one = sh_to_rgb(f_dc, f_rest, dirs, 1)
    changed = f_rest.clone()
    changed[:, 3:] = 0  # degrees 2 and 3 left out at degree 1
    assert torch.equal(one, sh_to_rgb(f_dc, changed, dirs, 1))
    assert not torch.equal(one, sh_to_rgb(f_dc, f_rest, dirs, 2))
    assert torch.allclose(sh_to_rgb(f_dc, f_rest, dirs * 7.0, 3), sh_to_rgb(f_dc, f_rest, dirs, 3))  # any length


def test_threeds_render_equals_gsplats_own_sh_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same Gaussians with degree-3 coefficients: threed's per-view colours (colors_seen_from) through
    threed's rasterizer, and the coefficients themselves through gsplat's rasterization(sh_degree=3), which
    takes the direction from each camera's centre and adds 0.5 itself (tests/gsplat_cpu.py runs it on a CPU).
    Opacities below 0.35, as in the agreement test of tests/test_splat_gsplat.py, whose tolerances these are.
    Measured: the two differ by at most 6.9e-7 (mean 1.6e-8), where the higher degrees move the seen pixels by
    0.047 on average; with the direction reversed (from the Gaussian to the camera) they would differ by up
    to 0.40 (mean 0.016)."""
    gsplat_cpu = pytest.importorskip("gsplat_cpu")
    gsplat_cpu.use_on_cpu(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    n, width, height = 300, 64, 48
    means = (torch.rand(n, 3, generator=gen) - 0.5) * 0.8
    log_scales = torch.log(0.03 + 0.06 * torch.rand(n, 3, generator=gen))
    opacities = 0.05 + 0.3 * torch.rand(n, generator=gen)
    gs = Gaussians(means, log_scales, torch.randn(n, 4, generator=gen), torch.logit(opacities),
                   torch.randn(n, 3, generator=gen) * 0.5, torch.randn(n, 15, 3, generator=gen) * 0.3)
    cams = make_cameras(torch.tensor([10.0, -20.0]), torch.tensor([30.0, 200.0]), torch.tensor([2.2, 2.6]),
                        torch.tensor([45.0, 55.0]), width, height)
    background = torch.zeros(2, height, width, 3)
    with torch.no_grad():
        args = (cams.c2w, cams.fovy, width, height, background)
        ours = splat.render(gs.means, gs.scales, gs.quaternions, gs.opacities,
                            gs.colors_seen_from(cams.c2w[:, :3, 3], 3), *args)
        flat = splat.render(gs.means, gs.scales, gs.quaternions, gs.opacities, gs.colors, *args)
        viewmats, ks = splat_gsplat.opencv_cameras(cams.c2w, cams.fovy, width, height)
        coeffs = torch.cat([gs.f_dc[:, None], gs.f_rest], dim=1)  # (N, 16, 3)
        image, _, _ = gsplat_cpu.gsplat.rasterization(gs.means, gs.quaternions, gs.scales, gs.opacities, coeffs,
                                                      viewmats, ks, width, height, eps2d=splat.DILATION,
                                                      packed=False, sh_degree=3)
    assert float(ours.opacity.mean()) > 0.1
    seen = ours.opacity[..., 0] > 0.1
    assert float((ours.rgb - flat.rgb).abs()[seen].mean()) > 0.02  # the higher degrees change the image
    diff = (ours.rgb - image).abs()
    assert float(diff.max()) < 1e-2 and float(diff.mean()) < 1e-4


def test_a_view_dependent_colour_is_learnt_where_degree_zero_cannot() -> None:
    """One Gaussian seen from the front (+z) and the back (-z): red from one side, blue from the other. 200 Adam
    steps (lr 0.05) on the centre pixels' squared error. Measured: degree 1 reaches a mean absolute error of
    3e-7, degree 0 stays at 0.333 (purple, (0.5, 0, 0.5), both ways: the best it can do). Asserted: below 0.02
    and above 0.3."""
    cams = make_cameras(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.0, 2.0]),
                        torch.tensor([40.0, 40.0]), 16, 16)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    errors = {}
    for degree in (0, 1):
        gs = Gaussians(torch.zeros(1, 3), torch.full((1, 3), math.log(0.3)), torch.tensor([[1.0, 0, 0, 0]]),
                       torch.tensor([4.0]), torch.zeros(1, 3), torch.zeros(1, coefficients(degree), 3))
        opt = torch.optim.Adam([gs.f_dc, gs.f_rest], lr=0.05)
        for _ in range(200):
            colors = gs.colors_seen_from(cams.c2w[:, :3, 3], degree)
            out = splat.render(gs.means, gs.scales, gs.quaternions, gs.opacities, colors, cams.c2w, cams.fovy, 16,
                               16, torch.zeros(2, 16, 16, 3))
            centre = out.rgb[:, 6:10, 6:10] / out.opacity[:, 6:10, 6:10]
            loss = (centre - target[:, None, None]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        errors[degree] = float((centre.detach() - target[:, None, None]).abs().mean())
    assert errors[1] < 0.02 and errors[0] > 0.3, errors


def test_the_scene_switches_degrees_on_and_keeps_them(tmp_path: Path) -> None:
    """gaussians.sh_degree 2, one more degree every 3 steps: the degree in use, the coefficients' own learning
    rate, view-dependent renders, the 3DGS .ply's 24 f_rest columns, and a checkpoint's round trip."""
    cfg = build_config("dreamgaussian", ["device=cpu", "gaussians.num_points=60", "gaussians.sh_degree=2",
                                         "gaussians.sh_degree_every=3", "export.preview_views=0"])
    scene = GaussianScene(cfg, "cpu")
    gs = scene.gaussians
    assert gs.f_rest.shape == (60, 8, 3) and float(gs.f_rest.detach().abs().sum()) == 0  # 3DGS starts them at zero
    groups = scene.param_groups()
    assert any(len(params) == 1 and params[0] is gs.f_rest and lr(0) == pytest.approx(0.0005) for params, lr in groups)
    assert [scene.set_step(s) or scene.sh_active for s in (0, 2, 3, 5, 6, 100)] == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():
        gs.f_rest.normal_(generator=torch.Generator().manual_seed(0))
    cams = make_cameras(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 180.0]), torch.tensor([2.0, 2.0]),
                        torch.tensor([40.0, 40.0]), 24, 24)
    scene.eval()
    scene.set_step(0)
    with torch.no_grad():
        flat = scene.render(cams, "albedo").rgb
        scene.set_step(6)
        viewed = scene.render(cams, "albedo").rgb
    assert float((viewed - flat).abs().max()) > 0.05  # the higher degrees are in use
    written = scene.export_files(tmp_path)
    back = read_splat_ply(written[0])
    assert back["f_rest"].shape == (60, 8, 3) and torch.equal(torch.from_numpy(back["f_rest"]), gs.f_rest.detach())
    restored = GaussianScene.from_state(cfg, scene.state_dict(), "cpu")
    assert torch.equal(restored.gaussians.f_rest, gs.f_rest)
    restored.set_step(6)
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored.render(cams, "albedo").rgb, viewed)
