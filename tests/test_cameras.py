"""threed.cameras: look_at with an up vector, and the training cameras' perturbations (threestudio's
camera_perturb, center_perturb, up_perturb)."""

from __future__ import annotations

import math

import pytest
import torch

from threed.cameras import look_at, sample_cameras, spherical_position
from threed.config import CameraConfig, RenderConfig, build_config
from threed.errors import UserError


def test_look_at_with_an_up_vector_by_hand():
    """A camera at (0, 0, 2) looking at the origin with up (1, 1, 0)/sqrt(2): forward (0, 0, -1), right =
    forward x up = (1, -1, 0)/sqrt(2), the image's up = right x forward = (1, 1, 0)/sqrt(2)."""
    c2w = look_at(torch.tensor([[0.0, 0.0, 2.0]]), None, torch.tensor([[1.0, 1.0, 0.0]]))[0]
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[r, r, 0.0, 0.0], [-r, r, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(c2w, expected, atol=1e-6)
    # the default up is the scene's +y
    plain = look_at(torch.tensor([[0.0, 0.0, 2.0]]))[0]
    assert torch.allclose(plain[:3, 1], torch.tensor([0.0, 1.0, 0.0]))


def _draws(n: int, generator: torch.Generator) -> None:
    """The draws sample_cameras always made: distance, fovy, elevation, azimuth, the light's direction noise
    and its distance."""
    for _ in range(4):
        torch.rand(n, generator=generator)
    torch.randn(n, 3, generator=generator)
    torch.rand(n, generator=generator)


def test_without_jitter_the_random_stream_is_unchanged():
    n = 5
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cams = sample_cameras(CameraConfig(), n, 16, 16, a, RenderConfig())
    _draws(n, b)
    assert torch.equal(a.get_state(), b.get_state())
    target = cams.position + cams.c2w[:, :3, 2] * -cams.distance[:, None]  # the optical axis through the origin
    assert torch.allclose(target, torch.zeros(n, 3), atol=1e-5)


def test_jittered_cameras_are_look_at_of_the_perturbed_draws():
    """Replaying the generator: the position moved by U(-0.1, 0.1) per axis, the target N(0, 0.2^2), the up
    (0, 1, 0) + N(0, 0.02^2), drawn after the usual draws, give exactly the cameras' matrices; elevation,
    azimuth and distance are the unperturbed draws."""
    n = 7
    cfg = CameraConfig(position_jitter=0.1, center_jitter=0.2, up_jitter=0.02)
    a, b = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    cams = sample_cameras(cfg, n, 16, 16, a, RenderConfig())
    _draws(n, b)
    moved = (spherical_position(cams.elevation, cams.azimuth, cams.distance)
             + 0.1 * (2 * torch.rand(n, 3, generator=b) - 1))
    target = 0.2 * torch.randn(n, 3, generator=b)
    up = torch.tensor([0.0, 1.0, 0.0]) + 0.02 * torch.randn(n, 3, generator=b)
    assert torch.equal(cams.c2w, look_at(moved, target, up))
    assert torch.equal(a.get_state(), b.get_state())


def test_jitter_statistics():
    """Over 4000 cameras: the offsets from the sphere within +-0.1 per axis with the uniform's std 0.0577
    (within 5%); the origin's distance from the optical axis, a 2-D Gaussian's radius at std 0.2, has mean
    0.2 sqrt(pi / 2) = 0.251 (within 5%); the image's roll (how far its right axis tilts out of level) comes
    from the up vector's noise along that axis, |N(0, 0.02^2)| radians: mean 0.02 sqrt(2 / pi) = 0.914 degrees
    (measured 0.914, and 0 without up_jitter; within 10%)."""
    n = 4000
    cfg = CameraConfig(position_jitter=0.1, center_jitter=0.2, up_jitter=0.02)
    cams = sample_cameras(cfg, n, 16, 16, torch.Generator().manual_seed(0), RenderConfig())
    offset = cams.position - spherical_position(cams.elevation, cams.azimuth, cams.distance)
    assert float(offset.abs().max()) <= 0.1 + 1e-6
    assert float(offset.std()) == pytest.approx(0.1 / math.sqrt(3), rel=0.05)
    axis = -cams.c2w[:, :3, 2]
    to_origin = -cams.position
    miss = to_origin - (to_origin * axis).sum(-1, keepdim=True) * axis
    assert float(miss.norm(dim=-1).mean()) == pytest.approx(0.2 * math.sqrt(math.pi / 2), rel=0.05)
    right = cams.c2w[:, :3, 0]
    roll = torch.rad2deg(torch.asin((right[:, 1]).clamp(-1, 1)).abs())  # how far "right" tilts out of level
    assert float(roll.mean()) == pytest.approx(math.degrees(0.02 * math.sqrt(2 / math.pi)), rel=0.1)


def test_presets_perturb_as_their_references():
    for preset in ("dreamfusion-sd", "dreamfusion-sd-fast", "dreamfusion-sd-perpneg", "magic3d"):
        c = build_config(preset).camera
        assert (c.position_jitter, c.center_jitter, c.up_jitter) == (0.1, 0.2, 0.02), preset
    for preset in ("prolificdreamer", "cpu-tiny", "oracle", "magic3d-oracle", "clip"):
        c = build_config(preset).camera
        assert (c.position_jitter, c.center_jitter, c.up_jitter) == (0.0, 0.0, 0.0), preset


def test_negative_jitter_is_refused():
    with pytest.raises(UserError, match="camera.position_jitter"):
        build_config("cpu-tiny", ["camera.center_jitter=-0.1"])


def test_elevation_over_the_sphere_as_threestudio_draws_it():
    """With elevation_sphere_prob 1 every batch maps its uniform draws u in [0, 1] (the same draws as without:
    the stream only gains the coin) to asin(2 (p0 + (p1 - p0) u) - 1), p = (bound + 90) / 180, threestudio's
    inverse transform: sin(elevation) uniform in [lo / 90, hi / 90]. By hand for [-10, 45]: u = 0 -> asin(-1/9)
    = -6.38 degrees, u = 1 -> asin(1/2) = 30 degrees. Over 20000 cameras sin(elevation) has the uniform's mean
    (lo + hi) / 180 = 0.1944 and std (hi - lo) / 90 / sqrt(12) = 0.1764 (within 2%)."""
    plain = CameraConfig(elevation=(-10.0, 45.0))
    sphere = CameraConfig(elevation=(-10.0, 45.0), elevation_sphere_prob=1.0)
    a = sample_cameras(plain, 6, 8, 8, torch.Generator().manual_seed(5), RenderConfig())
    b = sample_cameras(sphere, 6, 8, 8, torch.Generator().manual_seed(5), RenderConfig())
    u = (a.elevation + 10.0) / 55.0
    p0, p1 = 80.0 / 180.0, 135.0 / 180.0
    assert torch.allclose(b.elevation, torch.rad2deg(torch.asin(2 * (p0 + (p1 - p0) * u) - 1)), atol=1e-4)
    assert torch.equal(a.azimuth, b.azimuth) and torch.equal(a.distance, b.distance)
    assert math.degrees(math.asin(2 * p0 - 1)) == pytest.approx(-6.38, abs=0.01)
    many = sample_cameras(sphere, 20000, 8, 8, torch.Generator().manual_seed(0), RenderConfig())
    sines = torch.sin(torch.deg2rad(many.elevation))
    assert float(sines.mean()) == pytest.approx(35.0 / 180.0, rel=0.02)
    assert float(sines.std()) == pytest.approx(55.0 / 90.0 / math.sqrt(12), rel=0.02)
    assert float(many.elevation.min()) >= -6.39 and float(many.elevation.max()) <= 30.0 + 1e-4


def test_half_the_batches_draw_over_the_sphere():
    """elevation_sphere_prob 0.5: a coin per batch (200 batches: 82..118 over the sphere, the 99% binomial
    interval around 100); over-the-sphere batches are told apart by an elevation outside their degree map."""
    cfg = CameraConfig(elevation=(-10.0, 45.0), elevation_sphere_prob=0.5)
    plain = CameraConfig(elevation=(-10.0, 45.0))
    g, h = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    flipped = 0
    for _ in range(200):
        cams = sample_cameras(cfg, 2, 8, 8, g, RenderConfig())
        ref = sample_cameras(plain, 2, 8, 8, h, RenderConfig())
        torch.rand(1, generator=h)  # the coin
        flipped += int(not torch.equal(cams.elevation, ref.elevation))
    assert 82 <= flipped <= 118


def test_dreamfusion_light_with_an_absolute_jitter_by_replay():
    """light_jitter 1 in scene units (threestudio's light_position_perturb): the light's direction is the
    camera's position plus the standard normal draw, normalised; its distance the uniform draw in
    light_distance (absolute here)."""
    n = 6
    a, b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    light = RenderConfig(light_distance=(0.8, 1.5), light_distance_absolute=True, light_jitter=1.0,
                         light_jitter_absolute=True)
    cams = sample_cameras(CameraConfig(), n, 8, 8, a, light)
    for _ in range(4):
        torch.rand(n, generator=b)
    noise = torch.randn(n, 3, generator=b)
    scale = 0.8 + 0.7 * torch.rand(n, generator=b)
    direction = cams.position + noise
    expected = direction / direction.norm(dim=-1, keepdim=True) * scale[:, None]
    assert torch.allclose(cams.light_position, expected, atol=1e-6)


def test_magic3d_light_lies_within_60_degrees_of_the_camera():
    """light_sample magic3d over 4000 cameras: the angle between the light's and the camera's directions is
    90 degrees less the elevation above the plane across the camera, uniform in [30, 90]: so uniform in
    [0, 60] (mean 30, within 3%; none beyond 60); the angle around the camera's direction uniform (the mean
    of the light's component along a fixed axis across it is about 0)."""
    light = RenderConfig(light_distance=(0.8, 1.5), light_distance_absolute=True, light_sample="magic3d")
    cams = sample_cameras(CameraConfig(), 4000, 8, 8, torch.Generator().manual_seed(0), light)
    cam = cams.position / cams.position.norm(dim=-1, keepdim=True)
    light = cams.light_position / cams.light_position.norm(dim=-1, keepdim=True)
    angle = torch.rad2deg(torch.acos((cam * light).sum(-1).clamp(-1, 1)))
    assert float(angle.max()) <= 60.0 + 1e-3 and float(angle.min()) >= 0.0
    assert float(angle.mean()) == pytest.approx(30.0, rel=0.03)
    up = torch.tensor([[0.0, 1.0, 0.0]]).expand_as(cam)
    across = torch.nn.functional.normalize(torch.cross(cam, up, dim=-1), dim=-1)
    assert abs(float((light * across).sum(-1).mean())) < 0.02
    assert cams.light_position.norm(dim=-1).min() >= 0.8 - 1e-5 and cams.light_position.norm(dim=-1).max() <= 1.5 + 1e-5
