"""threed.prompts: view-dependent texts, the on-disk embedding cache, and prompt validation."""

from __future__ import annotations

import hashlib

import pytest
import torch

from threed.cameras import make_cameras
from threed.config import CameraConfig, Config, GuidanceConfig, SDConfig
from threed.errors import UserError
from threed.prompts import EmbeddingCache, PromptEmbeddings, cache_dir


class CountingEncoder:
    """A stand-in text encoder: a fixed (4, 3) embedding per text, derived from its hash; counts calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    @staticmethod
    def embed(text: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([self.embed(t) for t in texts])


def cameras_at(elevations: list[float], azimuths: list[float]):
    n = len(azimuths)
    return make_cameras(torch.tensor(elevations), torch.tensor(azimuths), torch.full((n,), 2.0),
                        torch.full((n,), 50.0), 8, 8)


def test_view_dependent_texts_follow_the_camera():
    enc = CountingEncoder()
    p = PromptEmbeddings("a yellow rubber duck", "blurry", enc, "model-a", CameraConfig())
    cams = cameras_at([10, 10, 10, 10, 80], [0, 90, 180, -90, 30])
    assert p.views(cams) == ["front", "side", "back", "side", "overhead"]
    cond, uncond = p.for_cameras(cams)
    assert cond.shape == (5, 4, 3) and uncond.shape == (5, 4, 3)
    for i, view in enumerate(p.views(cams)):
        assert torch.equal(cond[i], enc.embed(f"a yellow rubber duck, {view} view"))
        assert torch.equal(uncond[i], enc.embed("blurry"))
    assert len(enc.calls) == 1  # everything embedded at construction, in one batch
    assert sorted(enc.calls[0]) == sorted([f"a yellow rubber duck, {v} view"
                                           for v in ("front", "side", "back", "overhead")] + ["blurry"])


def test_plain_prompt_when_view_dependence_is_off():
    enc = CountingEncoder()
    p = PromptEmbeddings("a duck", "", enc, "model-a", CameraConfig(), view_dependent=False)
    cond, uncond = p.for_cameras(cameras_at([10, 80], [180, 0]))
    assert torch.equal(cond[0], enc.embed("a duck")) and torch.equal(cond[1], enc.embed("a duck"))
    assert torch.equal(uncond[0], enc.embed(""))  # empty negative prompt: the unconditional embedding
    assert enc.calls == [["a duck", ""]]  # duplicates embedded once


def test_second_construction_hits_the_cache(_private_threed_cache):
    first, second = CountingEncoder(), CountingEncoder()
    a = PromptEmbeddings("a duck", "", first, "model-a", CameraConfig())
    b = PromptEmbeddings("a duck", "", second, "model-a", CameraConfig())
    assert len(first.calls) == 1 and second.calls == []
    assert all(torch.equal(a.cond[v], b.cond[v]) for v in a.cond) and torch.equal(a.uncond, b.uncond)
    assert cache_dir() == _private_threed_cache / "embeddings"
    assert len(list(cache_dir().glob("*.pt"))) == 5
    # Another model (or changed weights) is another key.
    other = CountingEncoder()
    PromptEmbeddings("a duck", "", other, "model-b", CameraConfig())
    assert len(other.calls) == 1 and len(other.calls[0]) == 5


def test_corrupt_cache_file_is_recomputed():
    enc = CountingEncoder()
    PromptEmbeddings("a duck", "", enc, "model-a", CameraConfig())
    cache = EmbeddingCache("model-a")
    broken = cache.path("a duck, back view")
    broken.write_bytes(b"not a torch file")
    again = CountingEncoder()
    p = PromptEmbeddings("a duck", "", again, "model-a", CameraConfig())
    assert again.calls == [["a duck, back view"]]
    assert torch.equal(p.cond["back"], enc.embed("a duck, back view"))
    assert torch.equal(cache.load("a duck, back view"), enc.embed("a duck, back view"))  # rewritten


def test_unwritable_cache_does_not_stop_a_run(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("THREED_CACHE", str(blocker))
    enc = CountingEncoder()
    p = PromptEmbeddings("a duck", "", enc, "model-a", CameraConfig())
    assert torch.equal(p.cond["front"], enc.embed("a duck, front view"))


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt_is_a_user_error(prompt):
    enc = CountingEncoder()
    with pytest.raises(UserError, match="the prompt is empty: pass --prompt"):
        PromptEmbeddings(prompt, "", enc, "model-a", CameraConfig())
    assert enc.calls == []


def test_real_text_encoder_is_not_called_on_a_cache_hit(tiny_sd_dir, monkeypatch):
    """Through StableDiffusionGuidance: the second construction embeds nothing."""
    from threed.guidance.stable_diffusion import StableDiffusionGuidance

    calls: list[list[str]] = []
    original = StableDiffusionGuidance.encode_text

    def counting(self, texts):
        calls.append(list(texts))
        return original(self, texts)

    monkeypatch.setattr(StableDiffusionGuidance, "encode_text", counting)
    cfg = GuidanceConfig(sd=SDConfig(model=str(tiny_sd_dir), resolution=16))
    first = StableDiffusionGuidance(Config(guidance=cfg, prompt="a yellow rubber duck"), "cpu")
    assert len(calls) == 1 and len(calls[0]) == 5
    second = StableDiffusionGuidance(Config(guidance=cfg, prompt="a yellow rubber duck"), "cpu")
    assert len(calls) == 1
    assert torch.equal(first.prompts.cond["side"], second.prompts.cond["side"])
    assert first.prompts.cond["side"].shape == (77, 32)


def test_view_indices_on_the_device_agree_with_the_view_names():
    """The index used to pick embeddings without a host read follows view_names' rules, on the thresholds
    themselves too (their float64 comparisons are repeated exactly)."""
    from threed.cameras import VIEWS, view_indices, view_names

    cfg = CameraConfig(front_threshold=40.0, back_threshold=50.5, overhead_threshold=55.0)
    g = torch.Generator().manual_seed(0)
    elevations = torch.cat([torch.rand(300, generator=g) * 100 - 10, torch.tensor([55.0, 55.0, 10.0, 10.0, 10.0])])
    azimuths = torch.cat([torch.rand(300, generator=g) * 360 - 180, torch.tensor([0.0, 40.0, 40.0, -129.5, 129.5])])
    cams = cameras_at(elevations.tolist(), azimuths.tolist())
    names = view_names(cams, cfg)
    assert [VIEWS[i] for i in view_indices(cams, cfg).tolist()] == names
    assert set(names) == set(VIEWS)
