"""CLIP R-precision on hand-built embeddings with known answers, and the evaluator embedding helpers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from threed.r_precision import clip_embed_images, clip_embed_texts, prompt_ranks, r_precision  # noqa: E402

E = torch.eye(4)  # prompt p's embedding is the unit vector e_p


def views(*vectors) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vectors])


def test_known_answer_r_at_1_and_r_at_2():
    text = E[:3, :3]
    results = torch.stack([
        views([1, 0, 0], [0.9, 0.1, 0]),          # true 0: both views closest to prompt 0 -> hit
        views([0, 0, 1], [0, 0.2, 1]),            # true 1: looks like prompt 2 -> miss; prompt 1 ranks 2nd
        # true 2: one view favours prompt 0, but averaged over views prompt 2 wins -> hit
        views([1, 0, 0.3], [0, 0, 1]),
        views([0, 0.3, 1], [0, 0.2, 1]),          # true 0: prompt 0 ranks last of 3 -> miss even at k=2
    ])
    truth = [0, 1, 2, 0]
    assert r_precision(results, text, truth, k=1) == pytest.approx(2 / 4)
    assert r_precision(results, text, truth, k=2) == pytest.approx(3 / 4)
    assert r_precision(results, text, truth, k=3) == pytest.approx(1.0)
    assert prompt_ranks(results, text, torch.tensor(truth)).tolist() == [0, 1, 0, 2]


def test_views_are_averaged_not_maxed():
    """Per-view argmax would pick prompt 0 in 2 of 3 views; the view-averaged similarity picks prompt 1."""
    text = E[:2, :2]
    result = views([1, 0.9], [1, 0.9], [0, 1]).unsqueeze(0)  # cos to p0: .74,.74,0 ; to p1: .67,.67,1
    assert r_precision(result, text, [1]) == 1.0
    assert r_precision(result, text, [0]) == 0.0


def test_scale_of_embeddings_does_not_matter():
    text = E[:3, :3]
    results = torch.stack([views([1, 0.2, 0], [1, 0, 0.1]), views([0, 1, 0.5], [0.1, 1, 0])])
    assert r_precision(results * 7.0, text * 0.1, [0, 1]) == r_precision(results, text, [0, 1]) == 1.0


def test_ties_count_against_the_result():
    """An embedding equally close to every prompt (e.g. an empty render) must not score by luck."""
    text = E[:3, :3]
    results = torch.ones(3, 2, 3)
    assert r_precision(results, text, [0, 1, 2]) == 0.0
    assert r_precision(results, text, [0, 1, 2], k=3) == 1.0


def test_chance_level_with_random_embeddings():
    """With random embeddings R@1 sits near chance 1/P: 400 results, 4 prompts, measured 0.240 for
    seed 0; a binomial(400, 0.25) has sd 0.022, so [0.15, 0.35] is a > 4 sd band."""
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(4, 32, generator=gen)
    results = torch.randn(400, 3, 32, generator=gen)
    truth = torch.randint(4, (400,), generator=gen)
    assert 0.15 < r_precision(results, text, truth) < 0.35


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        r_precision(torch.ones(2, 3), E, [0, 1])
    with pytest.raises(ValueError):
        r_precision(torch.ones(2, 1, 4), E, [0])
    with pytest.raises(ValueError):
        r_precision(torch.ones(2, 1, 3), E, [0, 1])


def test_no_results_is_nan():
    assert np.isnan(r_precision(torch.ones(0, 2, 4), E, torch.zeros(0, dtype=torch.long)))


@pytest.fixture(scope="module")
def tiny_evaluator(tmp_path_factory):
    from threed.clip_models import load_clip

    path = tmp_path_factory.mktemp("clip") / "tiny-eval.json"
    path.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    return load_clip(str(path), "none")


def test_embed_helpers_are_unit_norm_and_batch_independent(tiny_evaluator):
    model, mean_std, tok = tiny_evaluator
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    a = clip_embed_images(model, mean_std, images, batch_size=2)
    b = clip_embed_images(model, mean_std, torch.from_numpy(images).float() / 255.0, batch_size=16)
    assert a.shape == (5, 16)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)
    t = clip_embed_texts(model, tok, ["a cat", "a dog", "a cat"])
    assert t.shape == (3, 16) and torch.allclose(t[0], t[2]) and not torch.allclose(t[0], t[1])
