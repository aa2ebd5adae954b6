"""The gsplat backend of the Gaussian rasterizer (threed/render/splat_gsplat.py): its OpenCV cameras put every
point where threed's own projection does, the backend is chosen as documented and an impossible choice is one
line naming the fix, the first-use kernel build is announced once, and its images, opacities, depths and
pixel-mean gradients agree with threed's PyTorch rasterizer: on a CUDA machine with gsplat's kernels, and on
any machine through gsplat's own Python entry point with its CUDA primitives replaced by PyTorch
(tests/gsplat_cpu.py; gsplat is in the test extra), where a Gaussian stage also trains as it does on threed's
rasterizer."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import shapes
from threed import methods
from threed.cameras import make_cameras
from threed.cli import main
from threed.config import build_config
from threed.errors import UserError
from threed.fields.gaussians import Gaussians
from threed.render import splat, splat_gsplat
from threed.render.splat import SplatOutput
from threed.rundir import RunDir
from threed.scenes import gaussians as gaussian_scenes
from threed.scenes.gaussians import GaussianScene
from threed.stages import GAUSSIANS


def _cameras(width: int, height: int):
    return make_cameras(torch.tensor([15.0, -30.0, 60.0]), torch.tensor([0.0, 100.0, -150.0]),
                        torch.tensor([2.0, 2.5, 3.0]), torch.tensor([40.0, 50.0, 60.0]), width, height)


def _gaussians(n: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 0.8
    scales = 0.02 + 0.08 * torch.rand(n, 3, generator=g, dtype=dtype)
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    opacities = 0.2 + 0.75 * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, scales, quats, opacities, colors


def test_opencv_cameras_project_points_where_threeds_projection_does() -> None:
    width, height = 96, 64
    cams = _cameras(width, height)
    c2w, fovy = cams.c2w.double(), cams.fovy.double()
    means, scales, quats, _, _ = _gaussians(50)
    cov = splat.covariance_3d(scales, quats)
    viewmats, ks = splat_gsplat.opencv_cameras(c2w, fovy, width, height)
    assert ks[:, 0, 2].tolist() == [48.0] * 3 and ks[:, 1, 2].tolist() == [32.0] * 3
    for i in range(3):
        ours = splat.project(means, cov, torch.linalg.inv(c2w[i]), splat.focal_length(float(fovy[i]), height),
                             width, height)
        cam = means @ viewmats[i, :3, :3].T + viewmats[i, :3, 3]  # OpenCV: x right, y down, z forward
        assert bool((cam[:, 2] > 0).all())  # in front of the camera: +z
        pix = cam @ ks[i].T
        pix = pix[:, :2] / pix[:, 2:]
        assert torch.allclose(pix, ours.means2d, atol=1e-9)
        assert torch.allclose(cam[:, 2], ours.depths, atol=1e-12)
    # a point on the optical axis lands on the image's centre, one above it on a smaller row (row 0 on top)
    c2w0 = c2w[0]
    ahead = c2w0[:3, 3] - c2w0[:3, 2]  # one unit along the OpenGL camera's -z
    above = ahead + 0.1 * c2w0[:3, 1]  # and a bit along its +y (up)
    cam = torch.stack([ahead, above]) @ viewmats[0, :3, :3].T + viewmats[0, :3, 3]
    pix = cam @ ks[0].T
    pix = pix[:, :2] / pix[:, 2:]
    assert torch.allclose(pix[0], torch.tensor([48.0, 32.0], dtype=torch.float64), atol=1e-9)
    assert float(pix[1, 1]) < 32.0 and abs(float(pix[1, 0]) - 48.0) < 1e-9


def test_backend_choice_and_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert splat_gsplat.choose_backend("torch", "cuda") == "torch"
    assert splat_gsplat.choose_backend("auto", "cpu") == "torch"  # never gsplat on a CPU
    with pytest.raises(UserError, match="needs a CUDA device.*gaussians.backend=torch") as e:
        splat_gsplat.choose_backend("gsplat", "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown gaussians.backend"):
        splat_gsplat.choose_backend("tiles", "cpu")
    # CUDA without gsplat: the fix is named
    monkeypatch.setattr(splat_gsplat, "gsplat_available", lambda device: False)
    assert splat_gsplat.choose_backend("auto", "cuda") == "torch"
    with pytest.raises(UserError, match=r"pip install 'threed\[gsplat\]'.*gaussians.backend=torch") as e:
        splat_gsplat.choose_backend("gsplat", "cuda")
    assert "\n" not in str(e.value)
    # CUDA with gsplat: auto and gsplat load its kernels; auto falls back to torch when they cannot load
    loads = []
    monkeypatch.setattr(splat_gsplat, "gsplat_available", lambda device: True)
    monkeypatch.setattr(splat_gsplat, "ensure_kernels", lambda: loads.append(1))
    assert splat_gsplat.choose_backend("auto", "cuda") == "gsplat"
    assert splat_gsplat.choose_backend("gsplat", "cuda:0") == "gsplat"
    assert len(loads) == 2

    def fail() -> None:
        raise UserError("gsplat found no CUDA toolkit to build its kernels")

    monkeypatch.setattr(splat_gsplat, "ensure_kernels", fail)
    assert splat_gsplat.choose_backend("auto", "cuda") == "torch"
    with pytest.raises(UserError, match="no CUDA toolkit"):
        splat_gsplat.choose_backend("gsplat", "cuda")


def test_a_run_asking_for_gsplat_on_a_cpu_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shapes.sphere().export(tmp_path / "sphere.obj")
    code = main(["run", "--method", "dreamgaussian", "--guidance", "oracle", "--reference",
                 str(tmp_path / "sphere.obj"), "--device", "cpu", "--out", str(tmp_path / "run"),
                 "gaussians.backend=gsplat"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "needs a CUDA device" in err and "gaussians.backend=torch" in err
    cfg = build_config("dreamgaussian", ["gaussians.num_points=10", "device=cpu"])
    assert GaussianScene(cfg, "cpu").backend == "torch"  # auto on a CPU


def test_gsplat_never_sees_cpu_tensors() -> None:
    means, scales, quats, opacities, colors = _gaussians(3, dtype=torch.float32)
    cams = _cameras(8, 8)
    with pytest.raises(UserError, match="CUDA only"):
        splat_gsplat.render(means, scales, quats, opacities, colors, cams.c2w, cams.fovy, 8, 8,
                            torch.zeros(3, 8, 8, 3))


def test_the_kernel_build_is_announced_once_with_its_time(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    fake = types.ModuleType("gsplat")
    fake_cuda = types.ModuleType("gsplat.cuda")
    backend = types.ModuleType("gsplat.cuda._backend")
    backend._C = None  # what gsplat leaves when it finds no CUDA toolkit
    fake.cuda, fake_cuda._backend = fake_cuda, backend
    monkeypatch.setitem(sys.modules, "gsplat", fake)
    monkeypatch.setitem(sys.modules, "gsplat.cuda", fake_cuda)
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", backend)
    monkeypatch.setattr(splat_gsplat, "_kernels_ready", False)
    monkeypatch.setattr(splat_gsplat, "_kernels_error", "")
    with pytest.raises(UserError, match="no CUDA toolkit.*gaussians.backend=torch"):
        splat_gsplat.ensure_kernels()
    backend._C = object()
    with pytest.raises(UserError, match="no CUDA toolkit"):  # a failed load is not tried again
        splat_gsplat.ensure_kernels()
    monkeypatch.setattr(splat_gsplat, "_kernels_error", "")
    splat_gsplat.ensure_kernels()
    splat_gsplat.ensure_kernels()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gsplat: CUDA kernels ready in ") and " s " in out[0]


def test_densification_statistics_are_the_same_from_either_layout() -> None:
    """gsplat's (B, N, 2) pixel means feed the same NDC gradient statistics as threed's per-view list."""
    grads = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(0))
    radii = torch.tensor([[3, 0, 2, 1, 0], [0, 4, 2, 0, 0]])
    stacked = torch.zeros(2, 5, 2, requires_grad=True)
    stacked.grad = grads.clone()
    views = []
    for i in range(2):
        v = torch.zeros(5, 2, requires_grad=True)
        v.grad = grads[i].clone()
        views.append(v)
    a, b = (Gaussians.ball(5, 0.5, 0.1, torch.Generator().manual_seed(0)) for _ in range(2))
    a.add_stats(views, radii, 64, 32)
    b.add_stats(stacked, radii, 64, 32)
    assert torch.equal(a.grad_accum, b.grad_accum) and torch.equal(a.grad_count, b.grad_count)
    assert torch.equal(a.max_radii, b.max_radii)
    assert float(a.grad_count.sum()) == 5.0


@pytest.mark.cuda
@pytest.mark.skipif(importlib.util.find_spec("gsplat") is None, reason="needs gsplat (pip install 'threed[gsplat]')")
def test_gsplat_agrees_with_threeds_rasterizer_on_cuda() -> None:
    """gsplat's kernels against threed's rasterizer (tolerances in _agree_with_threeds_rasterizer). Its first
    run builds them (examples/gpu_session.py builds them beforehand, in the background)."""
    assert splat_gsplat.choose_backend("gsplat", "cuda") == "gsplat"
    _agree_with_threeds_rasterizer(torch.device("cuda"))


def test_gsplat_python_path_agrees_with_threeds_rasterizer_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same comparison through gsplat's own `rasterization()` on a CPU, its CUDA primitives replaced by
    tests/gsplat_cpu.py (gsplat's PyTorch references and a transcription of its compositing kernel): what
    threed passes to gsplat and does with its outputs (cameras, layouts, radii, background, depth, the pixel
    means' gradient) is checked on every CI run; gsplat's kernels only by the CUDA test above. Measured here:
    colour at most 1.1e-4 apart (mean 4e-8), opacity 8.6e-7, depth 2.3e-6, the gradients 4.6e-5 (pixel means)
    and 2.4e-5 (3-D means) relative; a principal point half a pixel off, or no OpenCV flip of the y axis, puts
    the colours 0.12 and 0.41 apart."""
    gsplat_cpu = pytest.importorskip("gsplat_cpu")
    gsplat_cpu.use_on_cpu(monkeypatch)
    _agree_with_threeds_rasterizer(torch.device("cpu"))


def _agree_with_threeds_rasterizer(device: torch.device) -> None:
    """Same Gaussians, same cameras, same per-pixel background through both backends: colours, opacity and
    depth agree per pixel, and the gradients of the same loss with respect to the pixel means (the
    densification statistic) and the 3D means agree. The opacities stay below 0.35, where both backends
    consider exactly the pixels with α ≥ 1/255 and no α reaches either clamp (0.99 here, 0.999 in gsplat up to
    1.5.3; see threed/render/splat_gsplat.py); 600 of them overlap enough to composite many layers. gsplat
    computes in float32 with fast exponentials, and a pixel may differ in whether a Gaussian just at
    α = 1/255 counts (at most 1/255 there), hence the tolerances."""
    width, height = 96, 64
    cams = _cameras(width, height)
    means, scales, quats, opacities, colors = (t.float().to(device) for t in _gaussians(600, seed=1))
    opacities = 0.05 + 0.3 * (opacities - 0.2) / 0.75  # in [0.05, 0.35]
    c2w, fovy = cams.c2w.to(device), cams.fovy.to(device)
    background = torch.rand(3, height, width, 3, generator=torch.Generator().manual_seed(2)).to(device)
    weights = torch.rand(3, height, width, 3, generator=torch.Generator().manual_seed(3)).to(device)
    outs, grads = [], []
    for backend in ("torch", "gsplat"):
        means_ = means.clone().requires_grad_(True)
        args = (means_, scales, quats, opacities, colors, c2w, fovy, width, height, background)
        out = splat.render(*args) if backend == "torch" else splat_gsplat.render(*args)
        ((out.rgb * weights).sum() + out.opacity.sum()).backward()
        g = torch.stack([v.grad for v in out.means2d]) if isinstance(out.means2d, list) else out.means2d.grad
        outs.append(out)
        grads.append((g, means_.grad))
    ours, theirs = (SplatOutput(o.rgb.detach(), o.opacity.detach(), o.depth.detach(), o.means2d, o.radii) for o in outs)
    assert ours.rgb.shape == theirs.rgb.shape and ours.opacity.shape == theirs.opacity.shape
    assert ours.depth.shape == theirs.depth.shape and ours.radii.shape == theirs.radii.shape
    assert float((ours.opacity > 0.05).float().mean()) > 0.1  # the views see the Gaussians
    for a, b in ((ours.rgb, theirs.rgb), (ours.opacity, theirs.opacity)):
        assert float((a - b).abs().max()) < 1e-2 and float((a - b).abs().mean()) < 1e-4
    assert float((ours.depth - theirs.depth).abs().mean()) < 1e-3
    both = (ours.radii > 0) & (theirs.radii > 0)
    assert float(both.sum()) >= 0.9 * float((ours.radii > 0).sum())
    g_ours, g_theirs = grads[0][0][both], grads[1][0][both]
    assert float((g_ours - g_theirs).norm() / g_ours.norm()) < 1e-2
    assert float((grads[0][1] - grads[1][1]).norm() / grads[0][1].norm()) < 1e-2


def test_gsplat_reference_projection_matches_threeds() -> None:
    """Where gsplat is importable (even without CUDA), its own PyTorch reference of the EWA projection, fed the
    converted cameras, gives threed's pixel means, conics (dilation and Jacobian clamp included) and depths."""
    torch_impl = pytest.importorskip("gsplat.cuda._torch_impl")
    width, height = 96, 64
    cams = _cameras(width, height)
    c2w, fovy = cams.c2w.double(), cams.fovy.double()
    means, scales, quats, _, _ = _gaussians(200, seed=4)
    means = means * 4.0  # some far off the image: the Jacobian's 1.3x frustum clamp matters
    cov = splat.covariance_3d(scales, quats)
    viewmats, ks = splat_gsplat.opencv_cameras(c2w, fovy, width, height)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(
        means, cov, viewmats, ks, width, height, eps2d=splat.DILATION, near_plane=0.01)
    for i in range(3):
        ours = splat.project(means, cov, torch.linalg.inv(c2w[i]), splat.focal_length(float(fovy[i]), height),
                             width, height)
        ok = (radii[i] > 0).all(-1) & (ours.radii > 0)
        assert int(ok.sum()) > 20
        assert torch.allclose(means2d[i][ok], ours.means2d[ok], atol=1e-9)
        assert torch.allclose(depths[i][ok], ours.depths[ok], atol=1e-12)
        assert torch.allclose(conics[i][ok], ours.conics[ok], rtol=1e-9, atol=1e-12)


def test_the_cpu_tile_intersection_is_gsplats_reference() -> None:
    """tests/gsplat_cpu.py's vectorised tile intersection gives the pairs, ids and order of gsplat's own
    PyTorch reference (a Python loop per Gaussian, too slow for a training run), culled Gaussians, Gaussians
    and Gaussians reaching past the image's edges included."""
    gsplat_cpu = pytest.importorskip("gsplat_cpu")
    g = torch.Generator().manual_seed(5)
    images, n, tile, tiles_x, tiles_y = 3, 40, 16, 6, 4
    means2d = torch.rand(images, n, 2, generator=g) * torch.tensor([tiles_x * tile + 40.0, tiles_y * tile + 40.0]) - 20
    radii = torch.randint(0, 30, (images, n, 2), generator=g, dtype=torch.int32)
    radii[0, :5] = 0  # culled
    depths = torch.rand(images, n, generator=g) + 0.5
    expected = gsplat_cpu.reference._isect_tiles(means2d, radii, depths, tile, tiles_x, tiles_y)
    got = gsplat_cpu.isect_tiles(means2d, radii, depths, tile, tiles_x, tiles_y)
    assert int(expected[0].sum()) > 100
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(gsplat_cpu.isect_offset_encode(got[1], images, tiles_x, tiles_y),
                       gsplat_cpu.reference._isect_offset_encode(expected[1], images, tiles_x, tiles_y))


@pytest.mark.slow(minutes=0.7)
def test_a_gaussian_stage_trained_through_gsplats_python_path_matches_the_torch_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dreamgaussian-oracle's Gaussian stage, 100 steps toward a torus (densified at steps 50 and 100), once on
    threed's rasterizer and once through gsplat's `rasterization()` (tests/gsplat_cpu.py): the scene's use of
    the (B, N, 2) pixel means, radii and outputs trains the same Gaussians. Measured (seeds 0 / 1): 7146 / 7219
    Gaussians on threed's path, 7143 / 7217 on gsplat's; their opacity renders from four views differ by 0.0020
    / 0.0020 on average, where the stage moved them by 0.086 / 0.087 from the ball it started from.
    Asserted: counts within 1%, renders within 0.01 (5x the measured difference, under an eighth of the
    change). 9-10 s on threed's path, 31 s on gsplat's, on one thread."""
    gsplat_cpu = pytest.importorskip("gsplat_cpu")
    reference = shapes.save(shapes.torus(), tmp_path / "torus.ply")
    cfg = build_config("dreamgaussian-oracle", [f"guidance.oracle.reference={reference}", "device=cpu",
                                                "checkpoint_every=0", "steps=100"])
    method = methods.get("dreamgaussian")
    cams = make_cameras(torch.tensor([0.0, 20.0, -20.0, 10.0]), torch.tensor([0.0, 90.0, 180.0, 270.0]),
                        torch.full((4,), 2.5), torch.full((4,), 49.1), 64, 64)

    def opacity(g: Gaussians) -> torch.Tensor:
        with torch.no_grad():
            return splat.render(g.means, g.scales, g.quaternions, g.opacities, g.colors, cams.c2w, cams.fovy, 64,
                                64, torch.zeros(4, 64, 64, 3)).opacity

    def trainer(name: str):
        return GAUSSIANS.trainer(cfg, "cpu", method.build_guidance(cfg, "cpu", GAUSSIANS), RunDir(tmp_path / name))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = opacity(trainer("start").scene.gaussians)
        ours = trainer("torch")
        ours.fit(100, progress=False)
        gsplat_cpu.use_on_cpu(monkeypatch)
        monkeypatch.setattr(gaussian_scenes, "choose_backend", lambda want, device: "gsplat")
        theirs = trainer("gsplat")
        assert (ours.scene.backend, theirs.scene.backend) == ("torch", "gsplat")
        theirs.fit(100, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = ours.scene.gaussians, theirs.scene.gaussians
    assert len(a) > 5500  # densified from the 5000 it started with
    assert abs(len(a) - len(b)) <= 0.01 * len(a)
    moved = float((opacity(a) - start).abs().mean())
    assert moved > 0.05
    assert float((opacity(a) - opacity(b)).abs().mean()) <= 0.01
