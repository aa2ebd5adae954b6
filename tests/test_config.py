"""Strict configs: presets load, overrides are typed, typos are errors that name the nearest key."""

import pytest

from threed.config import CONFIG_DIR, build_config, load_yaml, save_config
from threed.errors import UserError


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = build_config(preset)
    assert cfg.steps > 0


def test_dreamfusion_preset_has_the_paper_hyperparameters():
    cfg = build_config("dreamfusion-sd")
    assert (cfg.render.width, cfg.render.height) == (64, 64)
    assert cfg.guidance.guidance_scale == 100.0 and cfg.guidance.t_range == (0.02, 0.98)
    assert cfg.guidance.weighting == "sds"
    assert (cfg.field.n_levels, cfg.field.n_features_per_level, cfg.field.log2_hashmap_size) == (16, 2, 19)
    assert cfg.optim.lr == 0.01 and cfg.steps == 10000
    assert cfg.camera.distance == (1.5, 2.0) and cfg.camera.fovy == (40.0, 70.0)
    assert cfg.camera.elevation == (-10.0, 45.0)


def test_overrides_are_typed():
    cfg = build_config("cpu-tiny", ["render.width=48", "optim.lr=1e-3", "guidance.t_range=[0.1, 0.5]",
                                    "export.formats=[ply]", "prompt=a cat"])
    assert cfg.render.width == 48 and cfg.optim.lr == 1e-3
    assert cfg.guidance.t_range == (0.1, 0.5) and cfg.export.formats == ("ply",) and cfg.prompt == "a cat"


@pytest.mark.parametrize("override, words", [
    ("render.widht=3", ["render.widht", "render.width"]),
    ("rendr.width=3", ["rendr.width", "render.width"]),
    ("render.width=abc", ["render.width", "integer"]),
    ("render.shading=shiny", ["render.shading", "albedo"]),
    ("guidance.t_range=[0.9, 0.1]", ["guidance.t_range"]),
    ("export.video_resolution=100", ["export.video_resolution", "16"]),
    ("steps", ["key=value"]),
])
def test_bad_overrides_name_the_problem(override, words):
    with pytest.raises(UserError) as e:
        build_config("cpu-tiny", [override])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_unknown_key_in_a_preset_file_is_an_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("render:\n  withd: 3\n")
    with pytest.raises(UserError, match="render.withd"):
        build_config(str(path))


def test_saved_config_round_trips(tmp_path):
    cfg = build_config("dreamfusion-sd", ["render.width=96", "guidance.clip_models=[ViT-B-32, RN50]",
                                          "guidance.clip_pretrained=[none, none]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(base=load_yaml(tmp_path / "config.yaml"))
    assert again == cfg
