"""The per-step shading choice and the point light: threestudio's albedo share after the warm-up, and its
light distance in scene units."""

from __future__ import annotations

import pytest
import torch

from threed.cameras import sample_cameras
from threed.config import CameraConfig, RenderConfig, build_config
from threed.render.shading import pick_shading


def test_albedo_share_after_the_warm_up_is_threestudios():
    """threestudio's material after ambient_only_steps: albedo with probability 1 - diffuse_prob (0.25), else
    textureless half the time, else diffuse: 0.25 / 0.375 / 0.375. Over 4000 steps each count is binomial
    (sd <= 31); 4.5 sd around the expected count fails a correct rule with probability below 1e-4."""
    generator = torch.Generator().manual_seed(0)
    n = 4000
    picks = [pick_shading("random", 5, 0, 0.5, generator, albedo_prob=0.25) for _ in range(n)]
    for mode, p in (("albedo", 0.25), ("textureless", 0.375), ("lambertian", 0.375)):
        assert abs(picks.count(mode) - n * p) <= 4.5 * (n * p * (1 - p)) ** 0.5, mode
    assert {pick_shading("random", 99, 100, 0.5, generator, albedo_prob=0.25) for _ in range(20)} == {"albedo"}


def test_without_an_albedo_share_the_choice_is_unchanged():
    """albedo_prob 0 (every preset but those following threestudio) draws and decides as before it existed."""
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(200):
        before = "textureless" if torch.rand((), generator=b).item() < 0.5 else "lambertian"
        assert pick_shading("random", step, 0, 0.5, a) == before


@pytest.mark.parametrize("preset, render_prob, mesh_prob", [("dreamfusion-sd", 0.25, 0.0), ("magic3d", 0.25, 0.25),
                                                            ("cpu-tiny", 0.0, 0.0)])
def test_presets_albedo_share(preset, render_prob, mesh_prob):
    cfg = build_config(preset)
    assert (cfg.render.albedo_prob, cfg.mesh.albedo_prob) == (render_prob, mesh_prob)


def test_light_distance_in_scene_units_or_camera_distances():
    """The same draws either way: only the light's distance from the origin differs, absolute in [0.8, 1.5]
    (threestudio's light_distance_range) or that multiple of each camera's distance."""
    cfg = CameraConfig()
    relative = sample_cameras(cfg, 256, 8, 8, torch.Generator().manual_seed(0),
                              RenderConfig(light_distance=(0.8, 1.5)))
    absolute = sample_cameras(cfg, 256, 8, 8, torch.Generator().manual_seed(0),
                              RenderConfig(light_distance=(0.8, 1.5), light_distance_absolute=True))
    assert torch.equal(relative.c2w, absolute.c2w)
    r, a = relative.light_position.norm(dim=-1), absolute.light_position.norm(dim=-1)
    assert torch.allclose(r, a * relative.distance, rtol=1e-5)
    assert a.min() >= 0.8 - 1e-6 and a.max() <= 1.5 + 1e-6 and a.max() - a.min() > 0.6
    unit = torch.nn.functional.normalize
    assert torch.allclose(unit(relative.light_position, dim=-1), unit(absolute.light_position, dim=-1), atol=1e-6)
    assert build_config("dreamfusion-sd").render.light_distance_absolute
    assert not build_config("cpu-tiny").render.light_distance_absolute
