"""Image-to-3D under the oracle prior recovers a known shape: the input image is a mesh made here, rendered from
the reference camera; the oracle (threed/guidance/oracle.py) scores the novel views; the zero123 method's
reference-view losses hold the reference view to the image (configs/zero123-oracle.yaml, reduced)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import shapes
from threed import pipeline, raycast
from threed.config import build_config
from threed.guidance.oracle import reference_colors
from threed.image import reference_image
from threed.metrics import mesh_distance
from threed.scenes.reference import reference_camera

pytestmark = pytest.mark.slow(minutes=1.5)  # on one thread beside a second worker


@pytest.fixture(autouse=True)
def one_thread():
    """One PyTorch thread, as the measurement below was taken (and put back afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mesh_rgba(mesh: trimesh.Trimesh, image_cfg, size: int) -> np.ndarray:
    """(size, size, 4) uint8: the mesh's albedo seen from the reference camera, alpha its antialiased coverage
    (rendered over black and over white: alpha = 1 - (white - black); colour = black / alpha, straight)."""
    v = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    f = torch.tensor(np.asarray(mesh.faces))
    c = torch.tensor(reference_colors(mesh, (0.8, 0.8, 0.8)), dtype=torch.float32)
    cams = reference_camera(image_cfg, size)
    black, white = (raycast.render_mesh(v, f, c, cams, "albedo", 0.1, torch.full((1, size, size, 3), bg),
                                        supersample=4)[0] for bg in (0.0, 1.0))
    alpha = (1.0 - (white - black).mean(-1)).clamp(0, 1)
    rgb = torch.where(alpha[..., None] > 1e-4, black / alpha[..., None].clamp_min(1e-4), torch.zeros_like(black))
    return np.concatenate([(rgb.clamp(0, 1).numpy() * 255).round(), (alpha.numpy()[..., None] * 255).round()],
                          -1).astype(np.uint8)


def test_image_to_3d_under_the_oracle_recovers_the_shape(tmp_path: Path) -> None:
    """An ellipsoid (radii 0.55, 0.35, 0.4, colours by position) seen from the reference camera (5 degrees up,
    3.8 away, 20 degrees) is the input image; zero123-oracle with 150 steps at 32² renders, a 32² reference
    render and two oracle views per step. Measured (seed 0, one thread, 2-core CPU shared with three other jobs,
    load ~10): Chamfer-L1 0.727% of the reference's diagonal, reference-view PSNR 32.6 dB at 64², 69-74 s of
    CPU (user + sys) for the whole test, 2.6-6.8 min wall under that load; the same to the digits given with the
    reference views rasterized (the preset's guidance.oracle.renderer), 92 s on one thread beside a second pytest
    worker. Thresholds: the issue's 1% for Chamfer-L1; 30 dB for
    the PSNR (2.6 dB under the measurement; the untrained field's blob scores 9.4 dB)."""
    ref = shapes.ALL["ellipsoid"]()
    reference = shapes.save(ref, tmp_path / "ellipsoid.ply")
    image_cfg = build_config("zero123-oracle").image
    Image.fromarray(mesh_rgba(ref, image_cfg, 256), "RGBA").save(tmp_path / "input.png")
    cfg = build_config("zero123-oracle", [
        f"guidance.oracle.reference={reference}", f"image.path={tmp_path / 'input.png'}", "steps=150", "device=cpu",
        "render.width=32", "render.height=32", "image.sizes=[[0, 32]]", "guidance.oracle.views=2",
        "export.resolution=96", "export.video=false", "export.preview_views=0", "export.formats=[obj]",
        "checkpoint_every=0"])
    run = tmp_path / "run"
    pipeline.run(cfg, run, progress=False)
    pred = trimesh.load(run / "mesh.obj", force="mesh", process=False)
    distance = mesh_distance(pred, ref)
    assert distance["chamfer_l1_rel"] <= 0.01, distance
    trainer = pipeline.load_trainer(run, "cpu")
    with torch.no_grad():
        view = trainer.scene.render_reference(64).rgb[0]
    target = reference_image(cfg.image).over((1.0, 1.0, 1.0), 64)
    psnr = -10.0 * float(torch.log10((view - target).square().mean()))
    assert psnr >= 30.0, psnr
