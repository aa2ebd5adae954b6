"""CLIP guidance and CLIP loading, with tiny randomly initialised open_clip models (no weights needed)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from threed.cameras import orbit_cameras  # noqa: E402
from threed.clip_models import canonical_id, encode_images, encode_texts, load_clip, resolve_pretrained  # noqa: E402
from threed.config import CameraConfig, ClipConfig, Config, GuidanceConfig  # noqa: E402
from threed.errors import UserError  # noqa: E402
from threed.config import build_config  # noqa: E402
from threed.guidance.clip import (BLUR_KERNEL, ClipGuidance, blur, checkerboard, draw_backgrounds,  # noqa: E402
                                  fourier_image, fourier_raw, fourier_spectrum_shape, random_backgrounds,
                                  random_resized_crop)


def write_tiny_clip(path: Path, embed_dim: int = 16, image_size: int = 32) -> str:
    """An open_clip architecture small enough to run in milliseconds (full tokenizer vocabulary)."""
    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip-a.json")


@pytest.fixture(scope="module")
def tiny_clip_b(tmp_path_factory) -> str:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip-b.json", embed_dim=24)


def guidance_cfg(*archs: str, augs: int = 2, view_dependent: bool = False) -> GuidanceConfig:
    return GuidanceConfig(type="clip", view_dependent_prompting=view_dependent,
                          clip=ClipConfig(models=tuple(archs), pretrained=("none",) * len(archs), resolution=32,
                                          num_augs=augs))


def cams(n: int, size: int = 24):
    return orbit_cameras(CameraConfig(), n, size, size)


def test_gradients_reach_colour_and_opacity(tiny_clip):
    g = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip), prompt="a red chair"), "cpu")
    rgb = torch.rand(2, 24, 24, 3, requires_grad=True)
    opacity = torch.rand(2, 24, 24, 1, requires_grad=True)
    out = g(rgb, cams(2), 0, "albedo", torch.ones(2, 24, 24, 3), opacity=opacity)
    out["loss"].backward()
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert isinstance(out["clip_sim"], float) and -1.0 <= out["clip_sim"] <= 1.0
    assert rgb.grad.abs().sum() > 0 and opacity.grad.abs().sum() > 0
    assert torch.isfinite(rgb.grad).all() and torch.isfinite(opacity.grad).all()


def test_loss_is_negative_cosine_to_prompt(tiny_clip):
    """Without augmentation randomness (one full-size crop, no opacity) the loss is exactly -cos."""
    g = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip, augs=1), prompt="a blue vase"), "cpu")
    g.crop_scale = (1.0, 1.0)
    rgb = torch.rand(1, 32, 32, 3)
    out = g(rgb, cams(1, 32), 0, "albedo", torch.ones_like(rgb))
    model, mean_std, tok = load_clip(tiny_clip, "none")
    expected = (encode_images(model, mean_std, rgb) * encode_texts(model, tok, ["a blue vase"])).sum(-1)
    assert torch.allclose(out["loss"], -expected.mean(), atol=1e-5)


def test_negative_prompt_adds_weighted_similarity(tiny_clip):
    base = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip, augs=1), prompt="a cat"), "cpu")
    neg = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip, augs=1), prompt="a cat", negative_prompt="blurry"),
                       "cpu")
    for g in (base, neg):
        g.crop_scale = (1.0, 1.0)
    rgb = torch.rand(1, 32, 32, 3)
    model, mean_std, tok = load_clip(tiny_clip, "none")
    neg_sim = (encode_images(model, mean_std, rgb) * encode_texts(model, tok, ["blurry"])).sum()
    diff = neg(rgb, cams(1, 32), 0, "albedo")["loss"] - base(rgb, cams(1, 32), 0, "albedo")["loss"]
    assert torch.allclose(diff, neg.negative_weight * neg_sim, atol=1e-5)


def test_ensemble_averages_models(tiny_clip, tiny_clip_b):
    rgb = torch.rand(1, 32, 32, 3)
    losses = []
    for archs in ((tiny_clip,), (tiny_clip_b,), (tiny_clip, tiny_clip_b)):
        g = ClipGuidance(Config(guidance=guidance_cfg(*archs, augs=1), prompt="a boat"), "cpu")
        g.crop_scale = (1.0, 1.0)
        losses.append(g(rgb, cams(1, 32), 0, "albedo")["loss"])
    assert torch.allclose(losses[2], (losses[0] + losses[1]) / 2, atol=1e-5)


def test_view_dependent_prompts_follow_the_camera(tiny_clip):
    g = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip, view_dependent=True), prompt="a dog"), "cpu")
    assert g.texts["front"] == "a dog, front view" and g.texts["back"] == "a dog, back view"
    _, _, text, _ = g.models[0]
    assert not torch.allclose(text[0], text[2])  # front and back embeddings differ


def test_background_swap_keeps_opaque_pixels_and_replaces_transparent_ones(tiny_clip):
    g = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip, augs=3), prompt="x"), "cpu")
    g.crop_scale = (1.0, 1.0)
    fg = torch.rand(1, 32, 32, 3)
    old_bg = torch.zeros(1, 32, 32, 3)
    alpha = torch.zeros(1, 32, 32, 1)
    alpha[:, :, :16] = 1.0  # left half opaque
    rgb = alpha * fg + (1 - alpha) * old_bg
    out = g.augment(rgb, old_bg, alpha)
    assert out.shape == (3, 32, 32, 3)
    assert torch.allclose(out[:, :, :16], fg[:, :, :16].expand(3, -1, -1, -1), atol=1e-5)
    assert (out[:, :, 16:] - old_bg[:, :, 16:]).abs().mean() > 0.05  # the black background is gone


def test_background_kinds_and_blur_stds_are_dream_fields():
    """Dream Fields draws noise, checkerboard or Fourier backgrounds with probabilities 0.333/0.333/0.334 and a
    blur std uniform in [0, 10] px (config_base.py). 3000 draws: each count within 5 binomial standard
    deviations (25.8) of 1000, the stds' mean within 5 standard errors (0.053) of 5, a quarter below 2.5."""
    kinds, stds = draw_backgrounds(3000, torch.Generator().manual_seed(0))
    for kind, p in (("noise", 0.333), ("checkerboard", 0.333), ("fourier", 0.334)):
        assert abs(kinds.count(kind) - 3000 * p) < 5 * (3000 * p * (1 - p)) ** 0.5
    assert float(stds.min()) >= 0.0 and float(stds.max()) <= 10.0
    assert abs(float(stds.mean()) - 5.0) < 5 * 10 / 12 ** 0.5 / 3000 ** 0.5
    assert abs(float((stds < 2.5).float().mean()) - 0.25) < 5 * (0.25 * 0.75 / 3000) ** 0.5


def test_checkerboard_has_8_squares_a_side_in_two_colours():
    colours = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(1))
    for size, side in ((224, 28), (32, 4)):  # CLIP's input, and the tests' tiny CLIP
        board = checkerboard(size, colours)
        assert board.shape == (2, size, size, 3)
        for b in range(2):
            assert torch.equal(board[b, 0, 0], colours[b, 0]) and torch.equal(board[b, 0, side], colours[b, 1])
            assert torch.equal(board[b, side, 0], colours[b, 1]) and torch.equal(board[b, side, side], colours[b, 0])
            assert len(torch.unique(board[b].reshape(-1, 3), dim=0)) == 2
            # 8 runs along a row and down a column: 7 colour changes each
            assert int((board[b, 0, 1:] != board[b, 0, :-1]).any(-1).sum()) == 7
            assert int((board[b, 1:, 0] != board[b, :-1, 0]).any(-1).sum()) == 7
            squares = board[b].reshape(8, side, 8, side, 3)
            assert torch.equal(squares, squares[:, :1, :, :1].expand_as(squares))  # each square one colour


def test_fourier_background_has_the_reference_spectrum():
    """lucid's random image as Dream Fields uses it: amplitude ~ 1 / f^1.5, so the power falls as f^-3. The
    slope of log power against log frequency, over 32 random 64 px images and the frequencies 2/64 to 16/64,
    must be -3 (within 0.15); the images are in (0, 1) and smooth."""
    gen = torch.Generator().manual_seed(0)
    size = 64
    raw = fourier_raw(torch.randn(32, *fourier_spectrum_shape(size), generator=gen))  # (32, 64, 64, 3)
    power = torch.fft.fft2(raw.permute(0, 3, 1, 2)).abs().pow(2).mean(dim=(0, 1))  # (64, 64)
    f = torch.fft.fftfreq(size)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    rings = [k / size for k in range(2, 17)]
    mean_power = torch.stack([power[(radius - r).abs() < 0.5 / size].mean() for r in rings])
    x, y = torch.tensor(rings).log(), mean_power.log()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert abs(slope + 3.0) < 0.15, slope
    img = fourier_image(torch.randn(4, *fourier_spectrum_shape(224), generator=gen))
    assert img.shape == (4, 224, 224, 3) and float(img.min()) > 0.0 and float(img.max()) < 1.0
    noise = torch.rand(4, 224, 224, 3, generator=gen)
    step = lambda x: float((x[:, 1:] - x[:, :-1]).abs().mean())  # noqa: E731
    assert step(img) < 0.25 * step(noise)


def test_blur_is_a_15_tap_gaussian_with_zeros_beyond_the_border():
    """Dream Fields blurs with dm_pix.gaussian_blur(bg, std, kernel_size=15): taps at -7..7 px, weights
    exp(-t^2 / (2 std^2)) normalised, zero padding. A point spreads into that kernel's outer product; a white
    image keeps 1 inside and darkens at the corner to the square of the in-image taps' share."""
    assert BLUR_KERNEL == 15
    sigma = 3.0
    taps = [math.exp(-t * t / (2 * sigma * sigma)) for t in range(-7, 8)]
    k = torch.tensor(taps) / sum(taps)
    point = torch.zeros(1, 1, 31, 31)
    point[0, 0, 15, 15] = 1.0
    out = blur(point, torch.tensor([sigma]))[0, 0]
    expected = torch.zeros(31, 31)
    expected[8:23, 8:23] = k[:, None] * k[None, :]
    assert torch.allclose(out, expected, atol=1e-7)
    white = blur(torch.ones(2, 3, 40, 40), torch.tensor([sigma, 0.0]))
    assert torch.allclose(white[0, :, 20, 20], torch.ones(3), atol=1e-6)
    assert torch.allclose(white[0, :, 0, 0], torch.full((3,), float(k[7:].sum()) ** 2), atol=1e-6)
    assert torch.equal(white[1], torch.ones(3, 40, 40))  # std 0: unblurred
    bgs = random_backgrounds(6, 32, torch.Generator().manual_seed(0))
    assert bgs.shape == (6, 32, 32, 3) and float(bgs.min()) >= 0.0 and float(bgs.max()) <= 1.0


def test_dream_fields_crop_is_a_fixed_fraction_at_a_random_position():
    """crop_scale [80/88, 80/88] (Dream Fields' crop_width / render_width): on an 88 px render whose pixels hold
    their own coordinates, every 80 px output pixel reads the render 1:1 at an offset of 0 to 8 px, and 200
    crops use the whole range of offsets."""
    side = 80 / 88
    ys, xs = torch.meshgrid(torch.arange(88.0) + 0.5, torch.arange(88.0) + 0.5, indexing="ij")
    img = torch.stack([xs, ys, torch.zeros_like(xs)], dim=-1)[None].expand(200, -1, -1, -1)
    out = random_resized_crop(img, 80, (side, side), torch.Generator().manual_seed(0))
    j = torch.arange(80.0) + 0.5
    off_x = out[..., 0] - j[None, None, :]
    off_y = out[..., 1] - j[None, :, None]
    for off in (off_x, off_y):
        per_crop = off.flatten(1)
        assert torch.allclose(per_crop, per_crop[:, :1].expand_as(per_crop), atol=1e-3)  # a shift, no zoom
        assert float(per_crop.min()) >= -1e-3 and float(per_crop.max()) <= 8 + 1e-3
        assert float(per_crop[:, 0].min()) < 0.5 and float(per_crop[:, 0].max()) > 7.5
    big = random_resized_crop(img[:1], 224, (side, side), torch.Generator().manual_seed(0))  # CLIP's size
    assert torch.allclose(big[0, 0, 1:, 0] - big[0, 0, :-1, 0], torch.full((223,), 80 / 224), atol=1e-3)


def test_the_clip_preset_takes_dream_fields_crop_and_a_bad_crop_is_refused():
    cfg = build_config("clip")
    assert cfg.guidance.clip.crop_scale == pytest.approx((80 / 88, 80 / 88))
    assert cfg.loss.transmittance_target(250) == pytest.approx(1 - 1.2 * math.sqrt(0.5 * 0.1))
    for bad in ("[0.9, 0.5]", "[0.0, 1.0]", "[0.5, 1.5]"):
        with pytest.raises(UserError, match="guidance.clip.crop_scale"):
            build_config("clip", [f"guidance.clip.crop_scale={bad}"])


def test_random_resized_crop_is_identity_at_full_scale_and_zooms_otherwise():
    img = torch.rand(2, 16, 16, 3, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    same = random_resized_crop(img, 16, (1.0, 1.0), gen)
    assert torch.allclose(same, img, atol=1e-5)
    crop = random_resized_crop(img, 32, (0.5, 0.6), gen)
    assert crop.shape == (2, 32, 32, 3)
    crop.sum().backward()
    assert img.grad.abs().sum() > 0


def test_optimising_an_image_raises_clip_similarity(tiny_clip):
    """Gradient descent on a free image raises its (un-augmented) CLIP score. Measured with this tiny
    random model, 30 Adam steps at lr 0.05, seeds 0/1/2: 0.175 -> 0.578 / 0.658 / 0.581; we ask for +0.2."""
    g = ClipGuidance(Config(guidance=guidance_cfg(tiny_clip, augs=2), prompt="a green apple"), "cpu")
    model, mean_std, tok = load_clip(tiny_clip, "none")
    text = encode_texts(model, tok, ["a green apple"])
    logits = torch.zeros(1, 32, 32, 3, requires_grad=True)

    def score() -> float:
        with torch.no_grad():
            return float((encode_images(model, mean_std, torch.sigmoid(logits)) * text).sum())

    before = score()
    opt = torch.optim.Adam([logits], lr=0.05)
    for step in range(30):
        out = g(torch.sigmoid(logits), cams(1, 32), step, "albedo")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert score() > before + 0.2


def test_random_init_is_loud_and_reproducible(tiny_clip, capsys):
    m1, _, _ = load_clip(tiny_clip, "none")
    m2, _, _ = load_clip(tiny_clip, "none")
    err = capsys.readouterr().err
    assert "RANDOMLY INITIALISED" in err and "only for tests and timing" in err
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert not any(p.requires_grad for p in m1.parameters())


def test_local_checkpoint_loads(tiny_clip, tmp_path):
    model, _, _ = load_clip(tiny_clip, "none")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    ckpt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), ckpt)
    loaded, _, _ = load_clip(tiny_clip, str(ckpt))
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))


def test_checkpoint_of_another_architecture_is_a_user_error(tiny_clip, tiny_clip_b, tmp_path):
    model, _, _ = load_clip(tiny_clip_b, "none")
    ckpt = tmp_path / "b.pt"
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(UserError, match="cannot load CLIP"):
        load_clip(tiny_clip, str(ckpt))


@pytest.mark.parametrize("name, pretrained, message", [
    ("ViT-B-33", "none", "unknown CLIP architecture 'ViT-B-33'.*ViT-B-32"),
    ("ViT-B-32", "/no/such/file.bin", "CLIP checkpoint /no/such/file.bin not found"),
    ("ViT-B-32", "no_such_tag", "unknown pretrained tag 'no_such_tag'.*openai"),
    ("/no/such/arch.json", "none", "architecture file"),
])
def test_bad_clip_choices_are_user_errors(name, pretrained, message):
    with pytest.raises(UserError, match=message) as e:
        load_clip(name, pretrained)
    assert "\n" not in str(e.value)


def test_missing_weights_offline_fail_fast_with_download_hint(monkeypatch, tmp_path):
    """Offline and not cached: a one-line error naming the model, the tag and the download command.
    Measured: about 0.01 s (no network attempt); we allow 5 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # and no ~/.cache/clip
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        resolve_pretrained("ViT-B-32", "openai")
    assert time.perf_counter() - start < 5.0
    msg = str(e.value)
    assert "\n" not in msg and "ViT-B-32" in msg and "openai" in msg
    assert "hf download timm/vit_base_patch32_clip_224.openai" in msg


def test_cached_tag_is_found_without_network(monkeypatch, tmp_path, tiny_clip):
    """A tag whose file sits in the HF cache resolves offline to that file."""
    cache = tmp_path / "hub"
    snap = cache / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    (cache / "models--timm--vit_base_patch32_clip_224.openai" / "refs").mkdir()
    (cache / "models--timm--vit_base_patch32_clip_224.openai" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    path, tag_cfg = resolve_pretrained("ViT-B-32", "openai")
    assert Path(path).name == "open_clip_model.safetensors" and tag_cfg["quick_gelu"] is True


def test_canonical_id_matches_same_network():
    assert canonical_id("ViT-B/32", "OpenAI") == canonical_id("ViT-B-32-quickgelu", "openai")
    assert canonical_id("ViT-B-32", "openai") != canonical_id("ViT-B-16", "openai")
    assert canonical_id("ViT-B-32", "openai") != canonical_id("ViT-B-32", "laion2b_s34b_b79k")
