"""MVDream's cameras: the UNet's camera input (threed/guidance/mvdream_unet.py camera_condition) against
hand-computed matrices and the reference's own, and the multi-view batches (threed/cameras.py
sample_multiview_cameras) as MVDream-threestudio draws them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from threed.cameras import make_cameras, sample_cameras
from threed.config import CameraConfig, RenderConfig
from threed.guidance.mvdream_unet import camera_condition

DATA = Path(__file__).parent / "data" / "mvdream"


def _condition(elevation: list[float], azimuth: list[float], distance: float = 2.5) -> torch.Tensor:
    n = len(azimuth)
    cams = make_cameras(torch.tensor(elevation), torch.tensor(azimuth), torch.full((n,), distance),
                        torch.full((n,), 40.0), 8, 8)
    return camera_condition(cams.c2w).reshape(n, 4, 4)


def test_condition_by_hand():
    """threestudio's frame (z up, front +x), OpenGL camera axes (columns: right, up, back), position on the unit
    sphere. Elevation 0, azimuth 0: the camera on +x looking at the origin: right +y, up +z, back +x.
    Elevation 30, azimuth 90: at (0, cos 30, sin 30); right -x; up = right x forward = (0, -sin 30, cos 30)."""
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    expected = torch.tensor([
        [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
        [[-1.0, 0.0, 0.0, 0.0], [0.0, -s, c, c], [0.0, c, s, s], [0.0, 0.0, 0.0, 1.0]],
    ])
    assert torch.allclose(_condition([0.0, 30.0], [0.0, 90.0]), expected, atol=1e-6)
    # The distance does not enter: only the direction (normalize_camera).
    assert torch.allclose(_condition([30.0], [90.0], distance=7.0), expected[1:], atol=1e-6)


def test_condition_is_the_references_get_camera_turned_90_degrees():
    """The fidelity data's first object has the reference's get_camera(4, elevation=15, azimuth_start=0)
    (azimuths 0, 90, 180, 270, Blender frame, then normalize_camera): threed's azimuths -90, 0, 90, 180."""
    reference = load_file(DATA / "tiny-unet-io.safetensors")["camera"][:4]
    ours = _condition([15.0] * 4, [-90.0, 0.0, 90.0, 180.0]).reshape(4, 16)
    assert torch.allclose(ours, reference, atol=1e-6)


def test_multiview_batches_share_all_but_the_azimuth():
    cfg = CameraConfig(distance=(0.8, 1.0), fovy=(15.0, 60.0), elevation=(0.0, 30.0), views=4,
                       distance_relative=True, elevation_sphere_prob=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        cams = sample_cameras(cfg, 8, 16, 16, g, RenderConfig())
        for name in ("elevation", "distance", "fovy"):
            v = getattr(cams, name).reshape(2, 4)
            assert torch.equal(v, v[:, :1].expand(2, 4)), name
        steps = torch.remainder(cams.azimuth.reshape(2, 4).diff(dim=1), 360.0)
        assert torch.allclose(steps, torch.full_like(steps, 90.0), atol=1e-4)
        relative = cams.distance * torch.tan(0.5 * cams.fovy)
        assert relative.min() >= 0.8 - 1e-5 and relative.max() <= 1.0 + 1e-5
        assert cams.elevation.min() >= 0.0 and cams.elevation.max() <= 30.0 + 1e-4
        assert torch.allclose(cams.position.norm(dim=-1), cams.distance, atol=1e-5)
    with pytest.raises(ValueError, match="whole objects"):
        sample_cameras(cfg, 6, 16, 16, g, RenderConfig())


def test_single_views_draw_as_before():
    """views = 1 and distance_relative off: the draws of sample_cameras are untouched (same stream)."""
    a = sample_cameras(CameraConfig(), 4, 8, 8, torch.Generator().manual_seed(3), RenderConfig())
    b = sample_cameras(CameraConfig(views=1), 4, 8, 8, torch.Generator().manual_seed(3), RenderConfig())
    assert torch.equal(a.c2w, b.c2w)
    c = sample_cameras(CameraConfig(distance_relative=True), 4, 8, 8, torch.Generator().manual_seed(3), RenderConfig())
    assert torch.allclose(c.distance, a.distance / torch.tan(0.5 * a.fovy))
