"""threed.guidance.sds: the noise schedule, timestep sampling and annealing, weights, and the SDS loss."""

from __future__ import annotations

import pytest
import torch

from threed.config import GuidanceConfig
from threed.schedule import Schedule
from threed.guidance import sds


def test_schedule_matches_diffusers_scaled_linear():
    """Our alpha_bar is SD's: the same numbers as diffusers' DDPMScheduler with SD's config.

    Measured max difference 4.8e-7 (diffusers takes the cumulative product in float32, we in float64);
    2e-6 leaves 4x headroom and is still far below the smallest gap between neighbouring timesteps (5.7e-5).
    """
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod
    ours = sds.sd_alphas_cumprod()
    assert ours.shape == (1000,)
    assert torch.allclose(ours, ref.float(), atol=2e-6, rtol=0)
    assert (ours[1:] < ours[:-1]).all()  # more noise at every later step


def test_timesteps_cover_the_configured_range():
    """10,000 draws over the 961 allowed integers hit both ends (miss chance (960/961)^10000 ~ 3e-5)."""
    cfg = GuidanceConfig(t_min=Schedule.constant(0.02), t_max=Schedule.constant(0.98))
    t = sds.sample_timesteps(cfg, step=0, batch=10_000, num_train_timesteps=1000,
                             generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long
    assert int(t.min()) == 20 and int(t.max()) == 980


def test_timesteps_are_reproducible_from_the_generator():
    cfg = GuidanceConfig()
    a = sds.sample_timesteps(cfg, 0, 8, 1000, torch.Generator().manual_seed(3))
    b = sds.sample_timesteps(cfg, 0, 8, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_annealed_t_max_bounds_the_draws():
    cfg = GuidanceConfig(t_max=Schedule(0, 0.98, 0.5, 100))
    early = sds.sample_timesteps(cfg, 0, 4000, 1000, torch.Generator().manual_seed(0))
    late = sds.sample_timesteps(cfg, 1000, 4000, 1000, torch.Generator().manual_seed(0))
    assert int(early.max()) > 900  # 4000 draws over [20, 980]: P(all <= 900) = (881/961)^4000 ~ 0
    assert int(late.max()) <= 500 and int(late.min()) >= 20


def test_t_max_below_t_min_draws_t_min():
    """A schedule that crosses t_min (allowed at steps between its ends) never draws below t_min."""
    cfg = GuidanceConfig(t_min=Schedule.constant(0.3), t_max=Schedule(0, 0.9, 0.31, 10))
    t = sds.sample_timesteps(cfg, 10, 100, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 300 and int(t.max()) <= 310


def test_weights():
    abar = sds.sd_alphas_cumprod()
    assert torch.allclose(sds.weight("sds", abar), 1 - abar)
    assert torch.equal(sds.weight("uniform", abar), torch.ones_like(abar))
    fantasia3d = sds.weight("fantasia3d", abar)  # threestudio's "fantasia3d": sqrt(alpha_bar) (1 - alpha_bar)
    assert torch.allclose(fantasia3d, abar.sqrt() * (1 - abar))
    peak = int(fantasia3d.argmax())  # largest where alpha_bar = 1/3, smaller at both ends
    assert abs(float(abar[peak]) - 1 / 3) < 2e-3 and float(fantasia3d[peak]) == pytest.approx(2 / 27 ** 0.5, rel=1e-4)
    assert fantasia3d[0] < 0.01 and fantasia3d[-1] < 0.1  # SD's alpha_bar: 0.9991 at t = 0, 0.0047 at t = 999
    w = sds.weight("sds", abar)
    assert (w[1:] > w[:-1]).all()  # DreamFusion's w(t) = 1 - alpha_bar grows with the noise level
    with pytest.raises(ValueError):
        sds.weight("snr", abar)  # a former name whose formula matched no published weighting


def test_sds_loss_gradient_is_w_times_residual_over_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    eps_hat, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    w = torch.tensor([0.1, 0.5, 0.9])
    loss, grad = sds.sds_loss(x, eps_hat, eps, w)
    expected = w.view(3, 1, 1, 1) * (eps_hat - eps)
    assert torch.allclose(grad, expected)
    loss.backward()
    assert torch.allclose(x.grad, expected / 3, atol=1e-6)
    assert loss.item() == pytest.approx(0.5 * expected.pow(2).sum().item() / 3, rel=1e-5)


def test_sds_loss_clips_and_zeroes_nans():
    x = torch.zeros(1, 1, 1, 3, requires_grad=True)
    eps_hat = torch.tensor([[[[5.0, -5.0, float("nan")]]]])
    loss, grad = sds.sds_loss(x, eps_hat, torch.zeros_like(eps_hat), torch.ones(1), grad_clip=1.0)
    assert torch.equal(grad, torch.tensor([[[[1.0, -1.0, 0.0]]]]))
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_add_noise_is_the_schedulers():
    """Our forward diffusion equals DDPMScheduler.add_noise for SD's schedule (float32 both; measured
    difference 0; 1e-6 allows another rounding of the square roots)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = sds.add_noise(x, eps, sched.alphas_cumprod[t].float())
    assert torch.allclose(ours, sched.add_noise(x, eps, t), rtol=0, atol=1e-6)
