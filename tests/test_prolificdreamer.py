"""The prolificdreamer method: its presets, its own guidance.vsd section, the 64 -> 512 render switch, the
sparsity loss, chunk checkpointing at high resolution, and `threed run --method prolificdreamer` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from threed import methods, spec
from threed.cameras import make_cameras, view_names
from threed.cli import main
from threed.config import build_config
from threed.errors import UserError
from threed.fields.nerf import NeRFField
from threed.render.background import Background
from threed.render.volume import RenderOutput, VolumeRenderer
from threed.scenes.nerf import NeRFScene
from threed.trainer import Trainer


def resolve(cuda: bool = True, **kw):
    return spec.resolve(spec.RunOptions(**kw), cuda=cuda)


def test_preset_has_prolificdreamers_stage_one_values():
    cfg = build_config("prolificdreamer")
    assert cfg.method == "prolificdreamer" and cfg.steps == 25000
    assert cfg.render.size(0) == (64, 64) and cfg.render.size(4999) == (64, 64)
    assert cfg.render.size(5000) == (512, 512) and cfg.render.bound == 1.0
    g = cfg.guidance
    assert g.sd.guidance_scale == 7.5 and g.t_min(0) == 0.02
    assert (g.t_max(5000), g.t_max(5001)) == (0.98, 0.5)
    assert g.vsd.lora_lr(0) == 1e-4 and g.vsd.camera_dropout == 0.1 and g.vsd.lora_t == (0.0, 1.0)
    assert g.vsd.lora_model == ""  # one shared UNet unless the paper's separate SD 2.1 base is asked for
    assert cfg.camera.distance == (1.0, 1.5) and cfg.camera.fovy == (40.0, 70.0)
    assert cfg.loss.sparsity(0) == 10.0 and (cfg.loss.entropy(10000), cfg.loss.entropy(10001)) == (0.0, 1000.0)
    assert [s.name for s in methods.get("prolificdreamer").stages] == ["nerf", "geometry", "texture"]
    assert cfg.export.texture


def test_preset_has_threestudios_geometry_and_texture_stages():
    """prolificdreamer-geometry.yaml and prolificdreamer-texture.yaml (threestudio): the geometry stage scores
    normal maps with SDS at CFG 100 for 15k steps, the texture stage keeps that surface and runs VSD for 30k;
    both at 512² with stage 1's cameras and t_max 0.98 -> 0.5 at step 5000 (docs/RECIPES.md)."""
    from threed.stages import GEOMETRY, TEXTURE

    cfg = build_config("prolificdreamer")
    geometry, texture = GEOMETRY.config(cfg), TEXTURE.config(cfg)
    assert (geometry.steps, texture.steps) == (15000, 30000)
    for stage in (geometry, texture):
        assert (stage.render.width, stage.render.height) == (512, 512)
        assert stage.camera.distance == (1.0, 1.5) and stage.camera.fovy == (40.0, 70.0)
        assert stage.camera.elevation == (-10.0, 45.0)
        assert (stage.guidance.t_min(0), stage.guidance.t_max(5000), stage.guidance.t_max(5001)) == (0.02, 0.98, 0.5)
    assert geometry.render.shading == "normal" and geometry.guidance.sd.guidance_scale == 101.0
    assert (GEOMETRY.guidance, TEXTURE.guidance) == ("prior", "method")  # SDS, then VSD
    assert geometry.mesh.lr_texture(0) == 0.0 and geometry.mesh.loss.laplacian(0) > 0
    assert texture.render.shading == "albedo" and texture.guidance.sd.guidance_scale == 7.5
    assert texture.mesh.lr_sdf(0) == texture.mesh.lr_deformation(0) == 0.0  # the geometry is kept
    assert texture.mesh.lr_texture(0) == 0.01 and texture.mesh.lr_background(0) == 0.001
    assert texture.mesh.lr_texture_mlp(0) == 0.001 and texture.optim.optimizer == "adamw"  # grid 0.01, MLP 0.001


def test_the_geometry_stage_calls_views_front_and_back_within_its_own_cones():
    """threestudio's geometry stage sets no thresholds (45 degrees, its prompt processor's default) where its
    NeRF and texture stages set 30: a camera 40 degrees off the front is "front" only in the geometry stage."""
    from threed.stages import GEOMETRY, NERF, TEXTURE

    cfg = build_config("prolificdreamer")
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cam = make_cameras(one(10.0), one(40.0), one(1.5), one(60.0), 8, 8)
    names = {stage.name: view_names(cam, stage.config(cfg).camera)[0] for stage in (NERF, GEOMETRY, TEXTURE)}
    assert names == {"nerf": "side", "geometry": "front", "texture": "side"}


@pytest.mark.parametrize("preset", ["prolificdreamer", "prolificdreamer-cpu"])
def test_background_is_randomly_replaced_while_training_only(preset):
    """threestudio's random_aug: each training render's background is, with probability 0.5, one random colour
    per image. 400 renders: the count of replaced ones is Binomial(400, 0.5), mean 200, sd 10; a correct rate
    leaves [160, 240] with probability below 1e-4. At evaluation (exports, videos) it is always the learned one,
    and the geometry and texture stages keep their own setting (off, as threestudio's)."""
    cfg = build_config(preset)
    assert cfg.render.random_aug == 0.5 and cfg.geometry.random_aug == cfg.texture.random_aug == 0.0
    torch.manual_seed(0)
    background = Background(cfg.render)
    dirs = torch.nn.functional.normalize(torch.randn(2, 5, 6, 3), dim=-1)
    learned = background.eval()(dirs).detach()
    background.train()
    generator = torch.Generator().manual_seed(0)
    replaced = 0
    for _ in range(400):
        out = background(dirs, generator).detach()
        if not torch.equal(out, learned):
            replaced += 1
            assert torch.equal(out, out[:, :1, :1].expand_as(out))  # one colour per image ...
            assert not torch.equal(out[0, 0, 0], out[1, 0, 0])  # ... drawn for each image
    assert 160 <= replaced <= 240
    background.eval()
    assert all(torch.equal(background(dirs, generator), learned) for _ in range(50))
    scene = NeRFScene(build_config(preset, ["field.n_levels=2", "field.log2_hashmap_size=10",
                                            "render.occupancy_resolution=8"]), "cpu")
    scene.eval()
    cams = make_cameras(*(torch.tensor([v]) for v in (10.0, 30.0, 1.5, 50.0)), 8, 8)
    with torch.no_grad():
        learned = scene.background(cams.rays()[1])
        assert all(torch.equal(scene.render(cams, "albedo", generator=generator).background, learned)
                   for _ in range(20))


def test_method_presets_are_chosen_like_the_others():
    cfg, notes = resolve(method="prolificdreamer", prompt="a pineapple")
    assert cfg.method == "prolificdreamer" and cfg.steps == 25000 and notes == []
    cfg, notes = resolve(cuda=False, method="vsd", prompt="a pineapple")
    assert cfg.steps == build_config("prolificdreamer-cpu").steps and "prolificdreamer-cpu" in notes[0]
    cfg, _ = resolve(method="prolificdreamer", guidance="oracle", reference="shape.ply")
    assert cfg.guidance.type == "oracle" and cfg.steps == build_config("prolificdreamer-oracle").steps
    assert resolve(reference="shape.ply")[0].method == "dreamfusion"  # the oracle alone stays DreamFusion's


def test_vsd_settings_belong_to_prolificdreamer_only(tmp_path):
    with pytest.raises(UserError, match="guidance.vsd.lora_rank set, but this run's method is dreamfusion, not "
                                        "prolificdreamer: drop the setting or pass --method prolificdreamer"):
        resolve(prompt="x", overrides=["guidance.vsd.lora_rank=8"])
    cfg, _ = resolve(method="prolificdreamer", prompt="x", overrides=["guidance.vsd.lora_rank=8"])
    assert cfg.guidance.vsd.lora_rank == 8
    with pytest.raises(UserError, match="unknown config key 'guidance.vsd.rank'; did you mean: guidance.vsd.lora_rank"):
        build_config("prolificdreamer", ["guidance.vsd.rank=8"])
    path = tmp_path / "mine.yaml"
    path.write_text("method: prolificdreamer\nguidance:\n  vsd:\n    rank: 8\n")
    with pytest.raises(UserError, match="unknown config key 'guidance.vsd.rank' of the prolificdreamer method; "
                                        "its keys are: .*guidance.vsd.lora_rank"):
        build_config(str(path))
    with pytest.raises(UserError, match="guidance.vsd.camera_dropout"):
        build_config("prolificdreamer", ["guidance.vsd.camera_dropout=1.5"])
    with pytest.raises(UserError, match="method prolificdreamer takes the stable_diffusion or oracle prior"):
        resolve(method="prolificdreamer", guidance="clip", prompt="x")


class Recorder:
    """A stand-in prior that records the render sizes it is given."""

    def __init__(self):
        self.sizes = []

    def __call__(self, rgb, cameras, step, **_):
        self.sizes.append((step, tuple(rgb.shape[1:3]), (cameras.height, cameras.width)))
        return {"loss": ((rgb - 0.5) ** 2).mean()}


def test_training_renders_switch_to_the_high_resolution(tmp_path):
    cfg = build_config("cpu-tiny", ["render.width=8", "render.height=8", "render.hires_step=2",
                                    "render.hires_width=16", "render.hires_height=12", "render.num_samples=8",
                                    "field.n_levels=2", "field.max_resolution=32", "field.log2_hashmap_size=10",
                                    "loss.sparsity=10", "loss.orient=0", "checkpoint_every=0"])
    recorder = Recorder()
    trainer = Trainer(cfg, "cpu", recorder, run_dir=tmp_path)
    records = [trainer.train_step() for _ in range(4)]
    assert [s[1] for s in recorder.sizes] == [(8, 8), (8, 8), (12, 16), (12, 16)]
    assert all(s[1] == s[2] for s in recorder.sizes)
    assert all("loss_sparsity" in r for r in records)  # its value: test_sparsity_loss_is_prolificdreamers


def test_sparsity_loss_is_prolificdreamers():
    """mean(sqrt(opacity^2 + 0.01)) over the rendered opacity. The opacities are chosen so each root is
    exact (legs 0.1 and o of right triangles 5-12-13, 20-99-101, 3-4-5 scaled): roots 0.1, 0.26, 0.505,
    0.125, mean 0.99 / 4; d/do = o / sqrt(o^2 + 0.01) / 4 = 0, 12/13, 99/101, 3/5 over 4."""
    cfg = build_config("cpu-tiny", ["field.n_levels=2", "field.max_resolution=32", "field.log2_hashmap_size=10",
                                    "loss.sparsity=10"])
    scene = NeRFScene(cfg, "cpu")
    opacity = torch.tensor([0.0, 0.24, 0.495, 0.075]).view(1, 2, 2, 1).requires_grad_(True)
    zeros = torch.zeros(1, 2, 2, 3)
    out = RenderOutput(rgb=zeros, opacity=opacity, depth=torch.zeros(1, 2, 2, 1), background=zeros,
                       orient=torch.zeros(()))
    sparsity = scene.regularisers(out, step=0)["sparsity"]
    assert sparsity.item() == pytest.approx(0.99 / 4, rel=1e-6)
    sparsity.backward()
    expected = torch.tensor([0.0, 12 / 13, 99 / 101, 3 / 5]).view(1, 2, 2, 1) / 4
    torch.testing.assert_close(opacity.grad, expected, rtol=1e-6, atol=1e-7)


def test_chunk_checkpointing_gives_the_same_render_gradients_and_random_stream():
    """With render.checkpoint_rays below the ray count each chunk is recomputed in backward; the render, the
    field's gradients and the generator's state afterwards equal the plain path's (stratified samples are
    drawn from the generator, which the recomputation must replay)."""
    from threed.cameras import make_cameras, view_names
    from threed.config import FieldConfig, RenderConfig

    results = []
    for checkpoint_rays in (0, 100):
        cfg = RenderConfig(backend="torch", num_samples=12, chunk_rays=64, checkpoint_rays=checkpoint_rays,
                           occupancy_resolution=0, background="solid")
        torch.manual_seed(0)
        field = NeRFField(FieldConfig(backend="torch", n_levels=2, max_resolution=32, log2_hashmap_size=10,
                                      hidden_dim=16), 1.0, "cpu").train()
        cams = make_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.0]), torch.tensor([50.0]),
                            16, 16)
        gen = torch.Generator().manual_seed(1)
        out = VolumeRenderer(cfg, "cpu")(field, Background(cfg), cams, "albedo", generator=gen)
        (out.rgb.square().sum() + out.opacity.sum()).backward()
        grads = [p.grad.clone() for p in field.parameters()]
        results.append((out.rgb.detach(), grads, gen.get_state(), torch.rand(3, generator=gen)))
    (rgb_a, grads_a, state_a, next_a), (rgb_b, grads_b, state_b, next_b) = results
    assert torch.equal(rgb_a, rgb_b) and torch.equal(state_a, state_b) and torch.equal(next_a, next_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))
    assert any(a.abs().sum() > 0 for a in grads_a)


def test_prolificdreamer_run_end_to_end(tiny_sd_dir, tmp_path, capsys):
    """`threed run --method prolificdreamer` on the tiny SD trains its three stages and writes the run
    directory; the VSD stages' checkpoints carry their own particle score (the geometry stage's SDS has none);
    the render size switches at render.hires_step."""
    out = tmp_path / "pineapple"
    code = main(["run", "--method", "prolificdreamer", "--prompt", "a pineapple", "--model", str(tiny_sd_dir),
                 "--steps", "3", "--device", "cpu", "--out", str(out), "--quiet",
                 "render.width=16", "render.height=16", "render.hires_step=2", "render.hires_width=24",
                 "render.hires_height=24", "render.num_samples=16", "render.occupancy_resolution=16",
                 "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12",
                 "guidance.sd.resolution=32", "export.resolution=32", "export.video_frames=4",
                 "export.video_resolution=32", "export.preview_views=2", "log_every=1", "checkpoint_every=3",
                 "geometry.steps=2", "geometry.resolution=16", "geometry.width=32", "geometry.height=32",
                 "texture.steps=2", "texture.width=32", "texture.height=32", "export.texture_size=64"])
    assert code == 0, capsys.readouterr().err
    for name in ["config.yaml", "metrics.jsonl", "mesh.obj", "mesh.png", "mesh.glb", "mesh-nerf.obj",
                 "mesh-geometry.obj", "turntable.mp4", "preview.png"]:
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    nerf = [r for r in records if "loss" in r and r.get("stage", "nerf") == "nerf"]
    geometry = [r for r in records if "loss" in r and r.get("stage") == "geometry"]
    texture = [r for r in records if "loss" in r and r.get("stage") == "texture"]
    assert [r["step"] for r in nerf] == [1, 2, 3] and [r["step"] for r in geometry] == [4, 5]
    assert [r["step"] for r in texture] == [6, 7]
    assert all(r["particle_loss"] > 0 and "loss_sparsity" in r for r in nerf)
    assert all("particle_loss" not in r and "loss_laplacian" in r for r in geometry)
    assert all(r["particle_loss"] > 0 for r in texture)
    shaped = torch.load(out / "checkpoints" / "geometry" / "step-000002.pt", weights_only=False)
    textured = torch.load(out / "checkpoints" / "texture" / "step-000002.pt", weights_only=False)
    assert "params" not in shaped["guidance"]  # SDS: a random stream, no particle score
    for key in ("sdf", "deformation"):  # the texture stage keeps the geometry stage's surface, bit for bit
        assert torch.equal(shaped["geometry"][key], textured["geometry"][key]), key
    assert not all(torch.equal(shaped["texture"][k], textured["texture"][k]) for k in shaped["texture"])
    for checkpoint in (out / "checkpoints" / "nerf" / "step-000003.pt", out / "checkpoints" / "texture" / "step-000002.pt"):
        state = torch.load(checkpoint, weights_only=False)
        assert any("lora_B" in k for k in state["guidance"]["params"]), checkpoint
        assert "camera_embedding.linear_2.weight" in state["guidance"]["params"]
        assert state["guidance"]["optimizer"]["state"]  # AdamW moments of the LoRA
    assert "threed: done" in capsys.readouterr().out


def test_magic3d_refine_takes_a_prolificdreamer_run(tmp_path):
    """Refining a ProlificDreamer run's NeRF with Magic3D's SDS mesh stage: its guidance.vsd settings (the
    oracle preset's are not the defaults) belong to its method and are dropped, not an error."""
    from threed.config import save_config

    source = tmp_path / "pd"
    cfg = build_config("prolificdreamer-oracle", ["guidance.oracle.reference=/refs/shape.ply"])
    assert cfg.guidance.vsd.lora_samples != 1  # a setting the check would otherwise trip on
    save_config(cfg, source / "config.yaml")
    (source / "checkpoints").mkdir()
    (source / "checkpoints" / "step-000400.pt").write_bytes(b"")
    refined, notes, checkpoint = spec.resolve_refine(spec.RunOptions(method="magic3d-refine", from_run=str(source)),
                                                     cuda=False)
    assert refined.method == "magic3d-refine" and refined.steps == 400 and checkpoint.name == "step-000400.pt"
    assert refined.guidance.vsd == type(refined.guidance.vsd)()
    assert refined.mesh == build_config("magic3d-oracle").mesh
    # the source's later stages are not this run's: each section at its defaults
    assert refined.geometry == type(refined.geometry)() and refined.texture == type(refined.texture)()
