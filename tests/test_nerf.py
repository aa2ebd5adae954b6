"""The NeRF field: on empty batches (a chunk of rays that meets no occupied space evaluates it on zero points,
forward, backward and for normals), its two head layouts, and its coarse-to-fine levels (field.progressive_levels)."""

import pytest
import torch

from threed.config import FieldConfig, build_config
from threed.fields.nerf import NeRFField


@pytest.mark.parametrize("normals", ["finite_difference", "analytic"])
def test_zero_points(normals):
    torch.manual_seed(0)
    cfg = FieldConfig(backend="torch", n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32,
                      hidden_dim=16, normals=normals)
    field = NeRFField(cfg, 1.0).train()
    x = torch.zeros(0, 3)
    sigma, albedo = field(x)
    assert sigma.shape == (0,) and albedo.shape == (0, 3)
    assert field.density(x).shape == (0,) and field.albedo(x).shape == (0, 3)
    n = field.normal(x)
    assert n.shape == (0, 3)
    (sigma.sum() + albedo.sum() + n.sum()).backward()
    for p in field.parameters():
        assert p.grad is None or p.grad.abs().sum().item() == 0.0


def tiny(heads: str, **kw) -> FieldConfig:
    return FieldConfig(backend="torch", n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32,
                       hidden_dim=16, heads=heads, **kw)


def test_separate_heads_are_threestudios_two_mlps():
    """field.heads=separate: a density MLP (one output) and an albedo MLP (three) on the same hash-grid
    features, one hidden layer of hidden_dim each and no biases (threestudio's implicit-volume with VanillaMLP);
    forward agrees with density() and albedo(); gradients reach both heads and the grid."""
    torch.manual_seed(0)
    field = NeRFField(tiny("separate"), 1.0).train()
    heads = field.mlp
    assert [tuple(p.shape) for p in heads.density.parameters()] == [(16, 8), (1, 16)]
    assert [tuple(p.shape) for p in heads.feature.parameters()] == [(16, 8), (3, 16)]
    assert not any(isinstance(m, torch.nn.Linear) and m.bias is not None for m in heads.modules())
    x = torch.rand(64, 3) * 2 - 1
    sigma, albedo = field(x)
    assert sigma.shape == (64,) and albedo.shape == (64, 3) and bool((sigma >= 0).all())
    assert torch.allclose(sigma, field.density(x)) and torch.allclose(albedo, field.albedo(x))
    (sigma.sum() + albedo.sum()).backward()
    for p in field.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    shared = NeRFField(tiny("shared"), 1.0)
    assert [tuple(p.shape) for p in shared.mlp.parameters()] == [(16, 8), (16,), (4, 16), (4,)]


@pytest.mark.parametrize("normals", ["finite_difference", "analytic"])
def test_density_comes_from_the_density_head_only(normals):
    """The albedo head has no part in the density or its normals: changing it leaves both as they were, and
    they give it no gradient."""
    torch.manual_seed(0)
    field = NeRFField(tiny("separate", normals=normals), 1.0).train()
    x = torch.rand(32, 3) * 2 - 1
    before, normals_before = field.density(x).detach(), field.normal(x).detach()
    (field.density(x).sum() + field.normal(x).sum()).backward()
    assert all(p.grad is None for p in field.mlp.feature.parameters())
    assert all(p.grad is not None for p in field.mlp.density.parameters())
    with torch.no_grad():
        for p in field.mlp.feature.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(field.density(x), before) and torch.allclose(field.normal(x), normals_before)
    assert torch.equal(field(x)[0], before)


def test_separate_heads_checkpoint_round_trip_and_mismatch(tmp_path):
    """A separate-heads field saved and loaded gives the same outputs; a checkpoint of the other head layout
    is refused with one line (threed/scenes/nerf.py, load_state_dict)."""
    from threed.config import Config, build_config
    from threed.errors import UserError
    from threed.scenes.nerf import NeRFScene

    torch.manual_seed(0)
    field = NeRFField(tiny("separate"), 1.0)
    torch.save(field.state_dict(), tmp_path / "field.pt")
    again = NeRFField(tiny("separate"), 1.0)
    again.load_state_dict(torch.load(tmp_path / "field.pt"))
    x = torch.rand(16, 3) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(field(x), again(x)))
    cfg = build_config("cpu-tiny")
    shared_scene = NeRFScene(cfg, "cpu")
    separate_cfg = build_config("cpu-tiny", ["field.heads=separate"])
    assert isinstance(separate_cfg, Config) and separate_cfg.field.heads == "separate"
    with pytest.raises(UserError, match="does not match this field configuration") as e:
        NeRFScene(separate_cfg, "cpu").load_state_dict(shared_scene.state_dict())
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="field.heads"):
        build_config("cpu-tiny", ["field.heads=three"])


def test_progressive_levels_follow_threestudios_schedule():
    """dreamfusion-sd's [8, 2000, 500] (threestudio's ProgressiveBandHashGrid): 8 levels until step 2499, one
    more every 500 steps, all 16 from step 6000; without the key, every level at every step."""
    cfg = build_config("dreamfusion-sd", ["field.log2_hashmap_size=10", "field.max_resolution=64"]).field
    assert cfg.progressive_levels == (8, 2000, 500)
    field = NeRFField(cfg, 1.0)
    steps = {0: 8, 1999: 8, 2499: 8, 2500: 9, 3000: 10, 5999: 15, 6000: 16, 10000: 16}
    assert {s: field.active_levels(s) for s in steps} == steps
    plain = NeRFField(build_config("cpu-tiny").field, 1.0)
    assert plain.active_levels(0) == plain.cfg.n_levels


def test_masked_levels_give_zero_features_and_no_table_gradient():
    cfg = build_config("cpu-tiny", ["field.n_levels=4", "field.log2_hashmap_size=10", "field.max_resolution=64",
                                    "field.progressive_levels=[2, 10, 5]"]).field
    torch.manual_seed(0)
    field = NeRFField(cfg, 1.0)
    with torch.no_grad():
        field.encoding.params.uniform_(-1, 1)
    x = torch.rand(256, 3) * 2 - 1
    unmasked = field.encoding(((x + 1) * 0.5).clamp(0, 1))
    field.set_step(12)  # 2 levels of 4: features 0..3 of 8
    features = field._features(x)
    assert torch.equal(features[:, :4], unmasked[:, :4]) and not features[:, 4:].any()
    field.density(x).sum().backward()
    grad = field.encoding.params.grad.view(-1, cfg.n_features_per_level)
    first_two = field.encoding.offsets[2]  # the table rows of levels 0 and 1
    assert grad[:first_two].abs().sum() > 0 and not grad[first_two:].any()
    field.set_step(20)  # 2 + (20 - 10) // 5 = 4: every level
    assert torch.equal(field._features(x), unmasked)


def test_a_resumed_trainer_masks_as_its_last_step_did(tmp_path):
    """The mask is not saved: loading a checkpoint sets it from the step, so an export after a resume reads
    the field as training left it."""
    from test_trainer import SMALL, GreyTarget

    from threed.rundir import RunDir
    from threed.trainer import Trainer

    cfg = build_config("cpu-tiny", SMALL + ["field.progressive_levels=[1, 1, 2]"])
    first = Trainer(cfg, "cpu", GreyTarget(), run_dir=tmp_path)
    first.fit(4, progress=False)  # the last step trained is 3: 1 + (3 - 1) // 2 = 2 levels
    assert first.field.level_mask.tolist() == [1.0] * 4 + [0.0] * 4
    second = Trainer(cfg, "cpu", GreyTarget(), run_dir=tmp_path)
    assert second.field.level_mask.all()
    second.load_state_dict(torch.load(RunDir(tmp_path).checkpoints("nerf")[-1], weights_only=False))
    assert torch.equal(second.field.level_mask, first.field.level_mask)


@pytest.mark.parametrize("value", ["[8, 2000]", "[0, 0, 1]", "[17, 0, 1]", "[8, 0, 0]"])
def test_bad_progressive_levels_name_the_key(value):
    from threed.errors import UserError

    with pytest.raises(UserError, match="field.progressive_levels"):
        build_config("dreamfusion-sd", [f"field.progressive_levels={value}"])
