"""Checks that need a CUDA GPU (marker `cuda`; every test here is skipped without one).

Run them all on a GPU machine with

    HF_HUB_OFFLINE=1 python -m pytest -m cuda tests/test_cuda.py -v

Sections: the Triton hash grid at full size; the renderer's two backends (nerfacc against PyTorch, chunks of
rays that see only empty space); oracle convergence on CUDA. nerfacc's tests are skipped where nerfacc is not
installed (it JIT-builds its CUDA kernels on first use, about 80 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from threed.config import FieldConfig, RenderConfig, build_config
from threed.fields.hashgrid import TorchHashGrid

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_nerfacc = pytest.mark.skipif(importlib.util.find_spec("nerfacc") is None, reason="nerfacc is not installed")


# == hash grid: Triton kernels against the PyTorch grid at the dreamfusion-sd size ==========================
@needs_triton
def test_triton_hashgrid_matches_torch_at_dreamfusion_size():
    """16 levels x 2 features, 2^19 entries per level, 64 x 64 x 128 points (one dreamfusion-sd render's
    samples) plus the cube's corners and faces; table entries uniform in [-1, 1].

    Tolerances as in tests/test_hashgrid_triton.py: values 1e-6 * max |table| (8 float32 products summed in
    another order); table gradients 3e-4 * S_e with S_e = sum |w g| into entry e, i.e. 2 k u for k <= 2500
    summands: the coarsest level (16^3 entries) gets about 524288 * 8 / 15^3 = 1243 +- 35 per entry.
    """
    from threed.fields.hashgrid_triton import TritonHashGrid

    cfg = build_config("dreamfusion-sd", []).field
    torch.manual_seed(0)
    fast, ref = TritonHashGrid(cfg).cuda(), TorchHashGrid(cfg).cuda()
    with torch.no_grad():
        fast.params.uniform_(-1.0, 1.0)
        ref.params.copy_(fast.params)
    corners = torch.tensor([[i, j, k] for i in (0.0, 1.0) for j in (0.0, 1.0) for k in (0.0, 1.0)])
    faces = torch.rand(60, 3)
    faces[:10, 0], faces[10:20, 0], faces[20:30, 1], faces[30:40, 1], faces[40:50, 2], faces[50:, 2] = 0, 1, 0, 1, 0, 1
    x = torch.cat([torch.rand(64 * 64 * 128, 3), corners, faces]).cuda()
    a, b = fast(x), ref(x)
    assert (a - b).abs().max() <= 1e-6 * ref.params.abs().max(), f"max value difference {(a - b).abs().max():.3g}"
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    s = torch.autograd.grad((ref(x) * g.abs()).sum(), ref.params)[0]
    diff = (fast.params.grad - ref.params.grad).abs()
    assert (diff <= 3e-4 * s + 1e-30).all(), f"max table-gradient difference {diff.max():.3g}"
    # zero points on the GPU
    empty = fast(torch.zeros(0, 3, device="cuda"))
    assert empty.shape == (0, 32)
    empty.sum().backward()


@needs_triton
def test_auto_backend_is_triton_without_tinycudann():
    from threed.fields.hashgrid import make_hashgrid, tcnn_available

    name = make_hashgrid(FieldConfig(n_levels=2, log2_hashmap_size=10), "cuda")[1]
    assert name == ("tcnn" if tcnn_available("cuda") else "triton")


# == renderer: nerfacc against PyTorch, and chunks that see only empty space ==============================
def blob_camera(size: int = 48):
    from threed.cameras import make_cameras

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(20.0), one(30.0), one(2.0), one(50.0), size, size).to("cuda")


@needs_nerfacc
@pytest.mark.parametrize("shading", ["albedo", "textureless"])
def test_nerfacc_and_torch_renderers_agree(shading):
    """Both backends render a smooth Gaussian blob (tests/analytic_fields.py) at 128 samples / steps per
    diagonal, with occupancy grids that keep all but a negligible density (threshold 1e-6).

    On a CPU, the renderer's packed path with a plain marcher in nerfacc's place differs from the PyTorch path
    by at most 7e-5 (albedo) / 4e-4 (textureless) in rgb and 5e-6 in opacity (tests/test_volume.py); nerfacc
    adds early stopping at transmittance 1e-4 and its own interval placement. Allowed: 1e-3 albedo, 3e-3
    textureless, 1e-3 opacity.
    """
    from analytic_fields import GaussianBlob

    from threed.render.background import Background
    from threed.render.volume import VolumeRenderer

    field = GaussianBlob().cuda().eval()
    out = {}
    for backend in ("torch", "nerfacc"):
        cfg = RenderConfig(backend=backend, num_samples=128, occupancy_resolution=64, occupancy_threshold=1e-6,
                           background="solid")
        renderer = VolumeRenderer(cfg, "cuda")
        assert renderer.backend == backend
        renderer.rebuild_occupancy(field)
        out[backend] = renderer(field, Background(cfg).cuda().eval(), blob_camera(), shading)
    a, b = out["torch"], out["nerfacc"]
    assert a.opacity.max() > 0.99 and a.opacity.min() < 0.01
    tol = 1e-3 if shading == "albedo" else 3e-3
    assert (a.rgb - b.rgb).abs().max() < tol, f"max rgb difference {(a.rgb - b.rgb).abs().max():.3g}"
    assert (a.opacity - b.opacity).abs().max() < 1e-3


@pytest.mark.parametrize("backend", ["torch", pytest.param("nerfacc", marks=needs_nerfacc)])
@pytest.mark.parametrize("case", ["empty_occupancy_grid", "camera_looking_away"])
def test_render_of_only_empty_space_on_cuda(backend, case):
    """A training render through the field of the preset's backend (Triton grid without tinycudann) where no
    ray meets occupied space: the background, and a backward pass (nerfacc used to crash here)."""
    from threed.fields.nerf import NeRFField
    from threed.render.background import Background
    from threed.render.volume import VolumeRenderer

    colour = (0.3, 0.5, 0.7)
    cfg = RenderConfig(backend=backend, num_samples=64, occupancy_resolution=32, background="solid",
                       background_color=colour, chunk_rays=500)
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(n_levels=8, log2_hashmap_size=16, max_resolution=256), 1.0, "cuda").train()
    renderer = VolumeRenderer(cfg, "cuda")
    renderer.rebuild_occupancy(field)
    cam = blob_camera(size=40)
    if case == "empty_occupancy_grid":
        if backend == "torch":
            renderer.occupancy.binary.zero_()
        else:
            renderer.estimator.binaries.zero_()
    else:
        cam.c2w[:, :3, 0] *= -1  # turn 180 degrees about the up axis: every ray leaves the cube unmet
        cam.c2w[:, :3, 2] *= -1
    generator = torch.Generator().manual_seed(0)
    out = renderer(field, Background(cfg).cuda().train(), cam, "lambertian", need_normals=True, generator=generator)
    assert out.opacity.abs().max().item() == 0.0
    assert torch.allclose(out.rgb, torch.tensor(colour, device="cuda").expand_as(out.rgb))
    (out.rgb.mean() + out.orient).backward()


# == oracle convergence on CUDA ==========================================================================
def _recover_on_cuda(shape: str, render_backend: str, tmp_path: Path) -> dict:
    import shapes
    import trimesh

    from threed import pipeline
    from threed.metrics import mesh_distance

    reference = shapes.save(shapes.ALL[shape](), tmp_path / f"{shape}.ply")
    cfg = build_config("oracle", [f"guidance.oracle.reference={reference}", "device=cuda", f"render.backend={render_backend}",
                                  "export.video=false", "export.preview_views=0", "export.formats=[obj]",
                                  "checkpoint_every=0"])
    run = pipeline.run(cfg, tmp_path / "run", progress=False)
    pred = trimesh.load(run / "mesh.obj", force="mesh", process=False)
    out = mesh_distance(pred, shapes.ALL[shape]())
    print(shape, render_backend, {k: round(float(v), 4) for k, v in out.items() if np.isscalar(v)})
    return out


@pytest.mark.parametrize("render_backend", ["torch", pytest.param("nerfacc", marks=needs_nerfacc)])
def test_oracle_recovers_a_torus_on_cuda(render_backend, tmp_path):
    """configs/oracle.yaml (400 steps) on CUDA with the field backend `auto` (Triton without tinycudann).

    Measured before these backends existed: the same preset recovered three shapes at 0.33-0.89% Chamfer-L1
    on an H100 with nerfacc and the PyTorch grid (issue 7), the torus at 0.54% in 300 steps on a CPU
    (tests/test_oracle_convergence.py). Threshold: the issue's 1% of the bounding-box diagonal.
    """
    m = _recover_on_cuda("torus", render_backend, tmp_path)
    assert m["chamfer_l1_rel"] <= 0.01
