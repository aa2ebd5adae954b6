"""MVDream's loss (threed/guidance/mvdream.py): the std rescale and the joint oracle denoiser by hand, and the
guidance on a tiny random multi-view model (tests/tiny_models.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from threed.cameras import sample_cameras
from threed.config import build_config
from threed.guidance import mvdream
from tiny_models import build_tiny_mvdream


def test_std_rescale_by_hand():
    """Two objects of two views. Object 0: x0 = (1, -1 | 1, -1) (std sqrt(4/3)), x0_c twice as spread: factor 2;
    rescale 0.5 gives 0.5 * 2 x0 + 0.5 x0 = 1.5 x0. Object 1 equal spreads: factor 1, unchanged."""
    x0 = torch.tensor([[1.0, -1.0], [1.0, -1.0], [3.0, 1.0], [2.0, 0.0]])
    x0_c = torch.tensor([[2.0, -2.0], [2.0, -2.0], [3.0, 1.0], [2.0, 0.0]])
    out = mvdream.rescaled_x0(x0, x0_c, views=2, rescale=0.5)
    assert torch.allclose(out[:2], 1.5 * x0[:2], atol=1e-6)
    assert torch.allclose(out[2:], x0[2:], atol=1e-6)
    assert torch.equal(mvdream.rescaled_x0(x0, x0_c, 2, 0.0), x0)
    full = mvdream.rescaled_x0(x0, x0_c, 2, 1.0)
    assert math.isclose(float(full[:2].std()), float(x0_c[:2].std()), rel_tol=1e-6)


def test_x0_loss_gradient_is_x_minus_target():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    x0 = torch.randn(4, 3, 2, 2)
    loss, grad = mvdream.multiview_x0_loss(x, x0, x0, views=4, rescale=0.5)  # x0_c = x0: factor 1
    loss.backward()
    assert torch.allclose(x.grad, (x.detach() - x0) / 4, atol=1e-6)
    assert torch.allclose(grad, x.detach() - x0, atol=1e-6)
    assert math.isclose(float(loss.detach()), 0.5 * float(((x.detach() - x0) ** 2).sum()) / 4, rel_tol=1e-6)


def test_joint_denoiser_shares_one_posterior_per_object():
    """K = 2 reference groups, one object of two views, abar = 0.5 (r = 1), no noise: view 0 matches group 0
    exactly, view 1 is 1 from both groups' values: logits per group, summed over the views, are
    -0.5 (0 + 1) = -0.5 for group 0 and -0.5 (4 + 1) = -2.5 for group 1 (one pixel each)."""
    x = torch.tensor([[0.0], [1.0]])
    refs = torch.tensor([[[0.0], [2.0]], [[0.0], [2.0]]])  # (B=2, K=2, 1): group 0 all 0, group 1 all 2
    x0 = mvdream.joint_x0(x, refs, torch.full((2,), 0.5), torch.zeros(2, 1), views=2)
    w1 = 1.0 / (1.0 + math.exp(2.0))  # softmax of (-0.5, -2.5): group 1's weight
    assert torch.allclose(x0, torch.full((2, 1), 2.0 * w1), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mvdream(tmp_path_factory.mktemp("mvdream"))


def test_guidance_on_a_tiny_model(tiny_ckpt: Path):
    cfg = build_config("mvdream", [f"guidance.mvdream.model={tiny_ckpt}", "guidance.mvdream.resolution=16",
                                   "prompt=a yellow rubber duck", "device=cpu"])
    guidance = mvdream.MVDreamGuidance(cfg, "cpu")
    cams = sample_cameras(cfg.camera, 8, 16, 16, torch.Generator().manual_seed(0), cfg.render)
    rgb = torch.rand(8, 16, 16, 3, requires_grad=True)
    out = guidance(rgb, cams, step=0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert 0.0 < float(out["t"]) < 1.0
    with pytest.raises(Exception, match="whole objects"):
        guidance(rgb[:6], cams, step=0)
