"""threed.guidance.vsd: the VSD update, the camera-conditioned LoRA (peft) on a tiny random SD, dropout,
v-prediction, and checkpoints that resume the particle score's training bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import shapes
from threed.cameras import make_cameras
from threed.config import build_config
from threed.errors import UserError
from threed.guidance import sds, vsd
from threed.rundir import RunDir
from threed.trainer import Trainer

# Tiny sizes: 16x16 renders, a 32 px VAE input (16x16 latents on the tiny SD), a small hash grid.
TINY = ["render.width=16", "render.height=16", "render.num_samples=16", "render.occupancy_resolution=16",
        "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12", "guidance.sd.resolution=32",
        "render.hires_step=-1", "device=cpu", "checkpoint_every=2", "log_every=1"]


def sd_config(model_dir, *extra):
    return build_config("prolificdreamer-cpu", [f"guidance.sd.model={model_dir}", "prompt=a yellow rubber duck",
                                                *TINY, *extra])


def oracle_config(reference, *extra):
    return build_config("prolificdreamer-oracle", [f"guidance.oracle.reference={reference}", *TINY,
                                                   "guidance.oracle.views=2", "guidance.vsd.denoiser_channels=[8, 16]",
                                                   *extra])


def cameras(n: int = 2, size: int = 16):
    return make_cameras(torch.linspace(0.0, 30.0, n), torch.linspace(-90.0, 90.0, n), torch.full((n,), 1.5),
                        torch.full((n,), 50.0), size, size)


def render(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def base_weights(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="module")
def guidance(tiny_sd_dir, tmp_path_factory):
    """One shared-UNet VSD guidance on the tiny SD (building it is the slow part)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREED_CACHE", str(tmp_path_factory.mktemp("cache")))
        return vsd.build_vsd(sd_config(tiny_sd_dir), "cpu")


def test_one_unet_serves_both_scores(guidance):
    """The LoRA sits on the pretrained UNet itself: one UNet, adapters off and no class embedding outside the
    particle pass, the text encoder freed once the prompts are embedded."""
    g = guidance
    assert g.shared and g.unet is g.sd.unet
    assert g.unet.class_embedding is None and all(layer.disable_adapters for layer in g._lora_layers)
    assert g.sd.text_encoder is None
    names = set(g.trainable)
    assert any(".to_q.lora_A." in n for n in names) and any(".to_out.0.lora_B." in n for n in names)
    assert {"camera_embedding.linear_1.weight", "camera_embedding.linear_2.weight"} <= names
    assert all(p.dtype == torch.float32 for p in g.trainable.values())
    with g.particle_mode():
        assert all(p.requires_grad for p in g.trainable.values())
        assert g.unet.class_embedding is g.camera_embedding and not any(x.disable_adapters for x in g._lora_layers)


def test_lora_trains_while_the_base_unet_stays_bit_identical(guidance, tiny_sd_dir):
    """Three steps change every LoRA matrix and the camera MLP's last layer; every base UNet weight stays
    bit-identical, and the pretrained pass still equals the untouched model loaded afresh."""
    from diffusers import UNet2DConditionModel

    g = guidance
    before_base = base_weights(g.unet)
    before_lora = {k: p.detach().clone() for k, p in g.trainable.items()}
    cams = cameras()
    for step in range(3):
        out = g(render(seed=step), cams, step)
        out["loss"].backward()
        assert out["particle_loss"] > 0
    after_base = base_weights(g.unet)
    assert before_base.keys() == after_base.keys()
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)
    changed = [k for k, p in g.trainable.items() if not torch.equal(before_lora[k], p.detach())]
    lora_b = [k for k in g.trainable if "lora_B" in k]
    assert set(lora_b) <= set(changed) and "camera_embedding.linear_2.weight" in changed

    fresh = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 700])
    cond, uncond = g.sd.prompts.for_cameras(cams)
    with torch.no_grad():
        expected = fresh(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = expected.chunk(2)
    assert torch.equal(g.pretrained_eps(x, t, cams), eps_u + g.sd.sd.guidance_scale * (eps_c - eps_u))
    with torch.no_grad():
        particle = g.particle_prediction(x, t, g.plain_text(2), vsd.camera_condition(cams))
    assert (particle - eps_c).abs().max() > 1e-4  # the LoRA and the camera now change the prediction
    assert g.unet.class_embedding is None  # back to the pretrained model after the particle pass


def test_vsd_gradient_is_the_difference_of_the_two_predictions(guidance, monkeypatch):
    """Hand-checked case: the pretrained score predicts 0.7 everywhere, the particle score 0.2; the latents'
    gradient must be w(t) (0.7 - 0.2) / B with w(t) = 1 - abar_t at the drawn t, and the loss 0.5 |grad|^2 / B."""
    g = guidance
    seen = {}
    monkeypatch.setattr(g, "pretrained_eps", lambda x, t, c: torch.full_like(x, 0.7))

    def particle(x, t, text, camera):
        seen["t"], seen["camera"] = t.clone(), camera.clone()
        return torch.full_like(x, 0.2)

    monkeypatch.setattr(g, "particle_prediction", particle)
    monkeypatch.setattr(g, "train_particle_score", lambda *a: 0.0)
    encode = g.sd.encode_images

    def encode_and_keep(x):
        z = encode(x)
        z.retain_grad()
        seen["z"] = z
        return z

    monkeypatch.setattr(g.sd, "encode_images", encode_and_keep)
    cams = cameras()
    out = g(render(), cams, step=0)
    out["loss"].backward()
    w = (1.0 - sds.sd_alphas_cumprod()[seen["t"]]).view(-1, 1, 1, 1)
    expected = w * 0.5 * torch.ones_like(seen["z"]) / 2
    assert torch.allclose(seen["z"].grad, expected, rtol=1e-5, atol=0)
    assert out["loss"].item() == pytest.approx(0.5 * (2 * expected).pow(2).sum().item() / 2, rel=1e-5)
    assert torch.equal(seen["camera"], cams.c2w.reshape(2, 16))  # the update always sees the camera


def test_camera_dropout_drops_at_the_configured_rate(guidance, monkeypatch):
    """20,000 draws at p = 0.1: the count of dropped rows is Binomial(20000, 0.1), mean 2000, sd 42.4; the bound
    +-250 (5.9 sd) fails for a wrong rate of 0.09 or 0.11 (mean 1800 or 2200). Dropped rows are all zero, kept
    rows untouched. Through the guidance, guidance.vsd.camera_dropout sets the rate (0.3 over 4,000 rows:
    mean 1200, sd 29, bound +-150)."""
    condition = torch.randn(20_000, 16)
    dropped_rows, dropped = vsd.drop_cameras(condition, 0.1, torch.Generator().manual_seed(0))
    assert abs(int(dropped.sum()) - 2000) <= 250
    assert torch.equal(dropped_rows[dropped], torch.zeros_like(dropped_rows[dropped]))
    assert torch.equal(dropped_rows[~dropped], condition[~dropped])
    monkeypatch.setattr(guidance.cfg.vsd, "camera_dropout", 0.3)
    _, _, _, camera = guidance._training_draws(torch.zeros(4000, 4, 2, 2), torch.ones(4000, 16))
    assert abs(int((camera == 0).all(1).sum()) - 1200) <= 150
    assert int(((camera == 0).any(1) & ~(camera == 0).all(1)).sum()) == 0


def test_v_prediction_conversion():
    """eps_from_v inverts v = sqrt(abar) eps - sqrt(1 - abar) x0 at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps,
    and the v target is diffusers' DDPMScheduler.get_velocity."""
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 500, 990])
    abar = sds.sd_alphas_cumprod()[t]
    v = vsd.v_target(x0, eps, abar)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert torch.allclose(v, scheduler.get_velocity(x0, eps, t), atol=1e-5)
    x_t = vsd.add_noise(x0, eps, abar)
    assert torch.allclose(x_t, scheduler.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(vsd.eps_from_v(v, x_t, abar), eps, atol=1e-5)
    assert torch.equal(vsd.as_eps(v, x_t, abar, "epsilon"), v)


def test_a_v_prediction_lora_base_is_a_second_unet_converted_to_eps(tiny_sd_dir, tmp_path, monkeypatch):
    """guidance.vsd.lora_model naming another (v-prediction) model loads a second UNet; the particle update
    uses eps = sqrt(abar) v + sqrt(1 - abar) x_t, and the LoRA is trained toward v."""
    from diffusers import DDPMScheduler

    other = tmp_path / "sd-v"
    shutil.copytree(tiny_sd_dir, other)
    scheduler = DDPMScheduler.from_pretrained(other, subfolder="scheduler")
    DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction").save_pretrained(other / "scheduler")
    g = vsd.build_vsd(sd_config(tiny_sd_dir, f"guidance.vsd.lora_model={other}"), "cpu")
    assert not g.shared and g.unet is not g.sd.unet and g.lora_prediction_type == "v_prediction"
    assert g.unet.class_embedding is g.camera_embedding and g.sd.unet.class_embedding is None
    assert not any("lora_" in k for k in g.sd.unet.state_dict())

    seen = {}
    monkeypatch.setattr(g, "pretrained_eps", lambda x, t, c: torch.zeros_like(x))

    def particle(x, t, text, camera):
        seen["x_t"], seen["t"] = x.clone(), t.clone()
        return torch.full_like(x, 0.3)  # v

    monkeypatch.setattr(g, "particle_prediction", particle)
    monkeypatch.setattr(g, "train_particle_score", lambda *a: 0.0)
    out = g(render(1), cameras(1), step=0)
    abar = sds.sd_alphas_cumprod()[seen["t"]].view(-1, 1, 1, 1)
    eps = abar.sqrt() * 0.3 + (1 - abar).sqrt() * seen["x_t"]
    grad = (1 - abar) * (0.0 - eps)
    assert out["loss"].item() == pytest.approx(0.5 * grad.pow(2).sum().item(), rel=1e-5)


def test_an_incompatible_lora_base_is_refused(tiny_sd_dir, tmp_path):
    from diffusers import DDPMScheduler

    other = tmp_path / "sd-other-schedule"
    shutil.copytree(tiny_sd_dir, other)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(other / "scheduler")
    with pytest.raises(UserError, match="another noise schedule"):
        vsd.build_vsd(sd_config(tiny_sd_dir, f"guidance.vsd.lora_model={other}"), "cpu")


def test_the_particle_scores_adamw_takes_the_configured_eps(tiny_sd_dir, tmp_path):
    """threestudio's ProlificDreamer steps the LoRA with AdamW at eps 1e-15 (the preset's), betas (0.9, 0.99),
    torch's weight decay; the default eps is torch's 1e-8, for both priors."""
    g = vsd.build_vsd(sd_config(tiny_sd_dir, "guidance.vsd.lora_eps=1e-15"), "cpu")
    group = g.optimizer.param_groups[0]
    assert (group["eps"], group["betas"], group["weight_decay"]) == (1e-15, (0.9, 0.99), 0.01)
    reference = shapes.save(shapes.sphere(), tmp_path / "sphere.ply")
    assert vsd.build_vsd(oracle_config(reference), "cpu").optimizer.param_groups[0]["eps"] == 1e-8


def test_prior_specific_keys_are_checked(tmp_path):
    reference = shapes.save(shapes.sphere(subdivisions=1), tmp_path / "s.ply")
    with pytest.raises(UserError, match="guidance.vsd.lora_rank set, but only the stable_diffusion prior"):
        vsd.build_vsd(oracle_config(reference, "guidance.vsd.lora_rank=8"), "cpu")
    with pytest.raises(UserError, match="not a multiple of 4"):
        vsd.build_vsd(oracle_config(reference, "render.width=18", "guidance.vsd.denoiser_channels=[8, 8, 8]"), "cpu")


def _train(cfg, guidance, run_dir, steps, resume=False):
    trainer = Trainer(cfg, "cpu", guidance, run_dir=run_dir)
    if resume:
        trainer.load_state_dict(torch.load(RunDir(run_dir).checkpoints("nerf")[-1], weights_only=False))
    trainer.fit(steps, progress=False)
    return trainer


@pytest.mark.parametrize("prior", ["stable_diffusion", "oracle"])
def test_resume_continues_the_particle_score_bit_for_bit(prior, tiny_sd_dir, tmp_path):
    """4 straight steps == 2 steps, a checkpoint, a fresh process-like start (new guidance and trainer) and
    2 more: the field, the particle score (LoRA + camera MLP, or the pixel denoiser), both optimisers and the
    guidance's random stream all equal bit for bit on the CPU."""
    if prior == "oracle":
        cfg = oracle_config(shapes.save(shapes.sphere(subdivisions=1), tmp_path / "s.ply"))
    else:
        cfg = sd_config(tiny_sd_dir)
    straight = _train(cfg, vsd.build_vsd(cfg, "cpu"), tmp_path / "a", 4)
    _train(cfg, vsd.build_vsd(cfg, "cpu"), tmp_path / "b", 2)
    state = torch.load(RunDir(tmp_path / "b").checkpoints("nerf")[-1], weights_only=False)
    assert set(state["guidance"]) == {"params", "optimizer", "generator"} and state["step"] == 2
    resumed = _train(cfg, vsd.build_vsd(cfg, "cpu"), tmp_path / "b", 4, resume=True)
    assert resumed.step == straight.step == 4
    for p, q in zip(straight.field.parameters(), resumed.field.parameters()):
        assert torch.equal(p, q)
    a, b = straight.guidance.state_dict(), resumed.guidance.state_dict()
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert torch.equal(a["generator"], b["generator"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["particle_loss"] > 0 for r in records)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_base_with_float32_lora(tiny_sd_dir):
    """On CUDA the shared UNet is fp16 and frozen, the LoRA and camera MLP train in fp32 over it, and the
    base weights stay bit-identical through the particle score's training."""
    g = vsd.build_vsd(sd_config(tiny_sd_dir, "device=cuda", "guidance.sd.half_precision=true"), "cuda")
    assert g.dtype == torch.float16 and g.unet.dtype == torch.float16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in g.trainable.values())
    before = base_weights(g.unet)
    before_lora = {k: p.detach().clone() for k, p in g.trainable.items()}
    cams = cameras().to("cuda")
    for step in range(2):
        rgb = render(seed=step).detach().cuda().requires_grad_(True)
        out = g(rgb, cams, step)
        out["loss"].backward()
        assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in base_weights(g.unet).items())
    assert any(not torch.equal(before_lora[k], p) for k, p in g.trainable.items() if "lora_B" in k)
