"""Strict configs: presets load, overrides are typed, typos are errors that name the nearest key."""

import pytest

import json
from pathlib import Path

import yaml

from threed.config import CONFIG_DIR, DEFAULT_SD_MODEL, build_config, flatten, load_yaml, save_config, to_dict
from threed.errors import UserError
from threed.schedule import Schedule

SNAPSHOTS = Path(__file__).parent / "data" / "preset-snapshots"
# preset -> dotted key -> {old, new, reference}: the deliberate changes since the snapshots
CHANGES = yaml.safe_load((SNAPSHOTS / "changes.yaml").read_text())


@pytest.mark.parametrize("preset", ["dreamfusion-sd", "dreamfusion-sd-fast", "magic3d"])
def test_orientation_weight_ramps_like_threestudio(preset):
    """threestudio's lambda_orient [0, 10, 1000, 5000]: 10 at step 0, linear to 1000 at step 5000, then held."""
    orient = build_config(preset).loss.orient
    assert [orient(s) for s in (0, 1000, 2500, 5000, 10000)] == [10.0, 208.0, 505.0, 1000.0, 1000.0]

@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = build_config(preset)
    assert cfg.steps > 0


def test_dreamfusion_preset_has_the_paper_hyperparameters():
    cfg = build_config("dreamfusion-sd")
    assert (cfg.render.width, cfg.render.height) == (64, 64)
    assert cfg.guidance.sd.guidance_scale == 101.0  # the paper's w = 100 in (1 + w) eps_text - w eps_uncond
    assert (cfg.guidance.t_min(0), cfg.guidance.t_max(10**6)) == (0.02, 0.98)
    assert cfg.guidance.weighting == "sds"
    assert (cfg.field.n_levels, cfg.field.n_features_per_level, cfg.field.log2_hashmap_size) == (16, 2, 19)
    assert cfg.optim.lr(0) == 0.01 and cfg.steps == 10000
    assert cfg.camera.distance == (1.5, 2.0) and cfg.camera.fovy == (40.0, 70.0)
    assert cfg.camera.elevation == (-10.0, 45.0)


def test_overrides_are_typed():
    cfg = build_config("cpu-tiny", ["render.width=48", "optim.lr=1e-3", "guidance.t_min=0.1",
                                    "guidance.t_max=[0, 0.5, 0.3, 100]", "export.formats=[ply]", "prompt=a cat"])
    assert cfg.render.width == 48 and cfg.optim.lr == Schedule.constant(1e-3)
    assert cfg.guidance.t_max == Schedule(0, 0.5, 0.3, 100)
    assert cfg.export.formats == ("ply",) and cfg.prompt == "a cat"


@pytest.mark.parametrize("override, words", [
    ("render.widht=3", ["render.widht", "render.width"]),
    ("rendr.width=3", ["rendr.width", "render.width"]),
    ("render.width=abc", ["render.width", "integer"]),
    ("render.shading=shiny", ["render.shading", "albedo"]),
    ("guidance.t_min=0.99", ["guidance.t_min", "guidance.t_max"]),
    ("guidance.t_max=[0, 0.9, 1.5, 10]", ["guidance.t_min/t_max", "(0, 1)"]),
    ("optim.lr=[0, 0.01, 0.001]", ["optim.lr", "start_step"]),
    ("optim.lr=[0, 0.01, 0.0, 100]", ["optim.lr", "positive"]),
    ("guidance.guidance_scale=50", ["renamed", "guidance.sd.guidance_scale"]),
    ("guidance.clip_models=[RN50]", ["renamed", "guidance.clip.models"]),
    ("export.video_resolution=100", ["export.video_resolution", "16"]),
    ("render.random_aug=1.5", ["render.random_aug", "[0, 1]"]),
    ("mesh.random_aug=-0.1", ["mesh.random_aug", "[0, 1]"]),
    ("render.albedo_prob=2", ["render.albedo_prob", "[0, 1]"]),
    ("mesh.albedo_prob=-1", ["mesh.albedo_prob", "[0, 1]"]),
    ("render.light_distance=[1.5, 0.8]", ["render.light_distance", "near <= far"]),
    ("optim.optimizer=sgd", ["optim.optimizer", "adam, adamw"]),
    ("optim.lr_mlp=0", ["optim.lr_mlp", "positive"]),
    ("optim.lr_mlp=[0, 0.001, 0.0, 10]", ["optim.lr_mlp", "positive"]),
    ("optim.weight_decay=-0.01", ["optim.weight_decay", ">= 0"]),
    ("mesh.lr_texture_mlp=[0, -1, 0.1, 10]", ["mesh.lr_texture_mlp", ">= 0"]),
    ("guidance.weighting=snr", ["guidance.weighting", "fantasia3d"]),
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
    cfg = build_config("dreamfusion-sd", ["render.width=96", "guidance.clip.models=[ViT-B-32, RN50]",
                                          "guidance.clip.pretrained=[none, none]", "loss.opacity=[10, 0, 1, 20]",
                                          "optim.lr=[0, 0.01, 0.001, 100, cosine]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(base=load_yaml(tmp_path / "config.yaml"))
    assert again == cfg


def test_unknown_key_of_a_prior_lists_that_priors_keys(tmp_path):
    with pytest.raises(UserError) as e:
        build_config("cpu-tiny", ["guidance.sd.scale=3"])
    assert "guidance.sd.scale" in str(e.value)
    path = tmp_path / "mine.yaml"
    path.write_text("guidance:\n  oracle:\n    refrence: x.ply\n")
    with pytest.raises(UserError) as e:
        build_config(str(path))
    message = str(e.value)
    assert "for the oracle prior" in message
    for key in ("guidance.oracle.reference", "guidance.oracle.views", "guidance.oracle.jitter"):
        assert key in message


def test_renamed_key_in_a_preset_file_names_the_new_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("guidance:\n  oracle_views: 2\n")
    with pytest.raises(UserError, match="guidance.oracle.views"):
        build_config(str(path))


@pytest.mark.parametrize("preset", sorted(p.stem for p in SNAPSHOTS.glob("*.json")))
def test_every_old_preset_gives_the_same_values(preset):
    """tests/data/preset-snapshots/ holds each preset resolved by threed 0.1 (flat guidance keys, scalar
    annealers). Migrated to today's layout they must equal today's presets, value for value, but for the
    default Stable Diffusion id (its old repository left the hub) and the changes listed in changes.yaml."""
    old = json.loads((SNAPSHOTS / f"{preset}.json").read_text())
    assert old["guidance"]["model"] == "stabilityai/stable-diffusion-2-1-base"
    old["guidance"]["model"] = DEFAULT_SD_MODEL
    migrated = flatten(to_dict(build_config(base=old)))
    for key, change in CHANGES.get(preset, {}).items():  # the listed changes (changes.yaml), nothing else
        assert migrated[key] == change["old"], key
        migrated[key] = change["new"]
    assert migrated == flatten(to_dict(build_config(preset)))


@pytest.mark.parametrize("preset", sorted(CHANGES))
def test_listed_preset_changes_are_in_the_presets(preset):
    """Every change in tests/data/preset-snapshots/changes.yaml is a real change, names its reference, and is
    what the preset resolves to today (presets without a 0.1 snapshot are checked here only)."""
    assert (CONFIG_DIR / f"{preset}.yaml").exists()
    today = flatten(to_dict(build_config(preset)))
    for key, change in CHANGES[preset].items():
        assert set(change) == {"old", "new", "reference"} and change["reference"], key
        assert change["old"] != change["new"] and today[key] == change["new"], key


def test_a_saved_old_config_is_migrated():
    old = json.loads((SNAPSHOTS / "dreamfusion-sd.json").read_text())
    old["guidance"].update(t_max_end=0.5, t_anneal_steps=200, guidance_scale=7.5, oracle_views=2)
    old["loss"].update(transmittance_target=[0.3, 0.9], transmittance_anneal_steps=0)
    cfg = build_config(base=old)
    assert cfg.guidance.t_max == Schedule(0, 0.98, 0.5, 200)
    assert cfg.guidance.sd.guidance_scale == 7.5 and cfg.guidance.oracle.views == 2
    assert cfg.guidance.sd.model == "stabilityai/stable-diffusion-2-1-base"  # a saved run keeps its model
    # 0.1 reached the end of the target at step 1 when the anneal length was 0
    assert cfg.loss.transmittance_target(0) == 0.3 and cfg.loss.transmittance_target(1) == 0.9


def test_the_fast_preset_differs_from_dreamfusion_sd_only_in_its_autoencoder():
    """dreamfusion-sd-fast says it changes the math; this is the whole of the change."""
    fast, full = to_dict(build_config("dreamfusion-sd-fast")), to_dict(build_config("dreamfusion-sd"))
    assert fast["guidance"]["sd"].pop("vae") == "tiny" and full["guidance"]["sd"].pop("vae") == "full"
    assert fast["guidance"]["sd"]["tiny_vae_model"] == "madebyollin/taesd"
    assert fast == full
