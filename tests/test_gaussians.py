"""The Gaussian set (threed/fields/gaussians.py): ball start, statistics, clone / split / prune counts on a
hand-built set, opacity reset, and Adam's moments following the rows."""

from __future__ import annotations

import math

import pytest
import torch

from threed.fields.gaussians import NAMES, Gaussians, logit, nearest_neighbour_scale

EXTENT, PERCENT_DENSE = 4.0, 0.01  # DreamGaussian's: clone at most 0.04 wide, prune above 0.4


def _hand_built() -> Gaussians:
    """A: small and hot (clone), B: large and hot (split), C: faint (prune), D: huge (prune), E: kept."""
    means = torch.tensor([[0.0, 0, 0], [0.3, 0, 0], [0, 0.3, 0], [0, 0, 0.3], [0.2, 0.2, 0.2]])
    scales = torch.tensor([0.01, 0.1, 0.02, 0.5, 0.02])[:, None].repeat(1, 3)
    opac = torch.tensor([0.5, 0.6, 0.005, 0.5, 0.5])
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(5, 1)
    colours = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    sh_rest = torch.arange(45, dtype=torch.float32).reshape(5, 3, 3) / 45  # degree 1
    g = Gaussians(means, torch.log(scales), quats, logit(opac), colours, sh_rest)
    g.grad_accum[:] = torch.tensor([0.05, 0.03, 0.0, 0.0, 0.001])
    g.grad_count[:] = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0])
    return g


def _step(g: Gaussians, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss = sum((p ** 2).sum() for _, p in g.named_groups())
    loss.backward()
    opt.step()


def test_ball_start_is_dreamgaussians() -> None:
    g = Gaussians.ball(5000, 0.5, 0.1, torch.Generator().manual_seed(0))
    assert len(g) == 5000
    r = g.means.detach().norm(dim=-1)
    assert float(r.max()) <= 0.5
    assert float((r < 0.25).float().mean()) == pytest.approx(0.125, abs=0.02)  # uniform in volume: (1/2)^3
    assert torch.allclose(g.opacities, torch.full((5000,), 0.1), atol=1e-6)
    colours = g.colors.detach()
    assert float(colours.min()) >= 0.5 and float(colours.max()) < 0.5 + 0.2821 / 255 + 1e-6
    assert torch.equal(g.scales[:, 0], g.scales[:, 1])
    # the nearest-neighbour scale of a regular grid of spacing h is h
    grid = torch.stack(torch.meshgrid(*[torch.arange(5.0) * 0.1] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert float(nearest_neighbour_scale(grid)[62]) == pytest.approx(0.1, rel=1e-5)  # an inner point


def test_stats_accumulate_ndc_gradient_norms_of_seen_gaussians() -> None:
    g = _hand_built()
    g.grad_accum.zero_()
    g.grad_count.zero_()
    view = torch.zeros(5, 2, requires_grad=True)
    view.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    radii = torch.tensor([[3, 5, 0, 2, 1]])
    g.add_stats([view], radii, width=64, height=32)
    # pixels -> NDC: x W/2, y H/2
    assert torch.allclose(g.grad_accum, torch.tensor([32.0, 32.0, 0.0, math.hypot(32, 16), 0.0]))
    assert torch.equal(g.grad_count, torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(g.max_radii, torch.tensor([3.0, 5.0, 0.0, 2.0, 1.0]))


def test_clone_split_and_prune_counts_on_a_hand_built_set() -> None:
    g = _hand_built()
    a, b, e = (g.means.data[i].clone() for i in (0, 1, 4))
    b_colour, rest = g.f_dc.data[1].clone(), g.f_rest.data.clone()
    counts = g.densify_and_prune(None, 0.01, EXTENT, PERCENT_DENSE, min_opacity=0.01, prune_world_size=0.1,
                                 prune_screen_size=0.0, generator=torch.Generator().manual_seed(0))
    assert counts == {"cloned": 1, "split": 1, "pruned": 2}
    assert len(g) == 5 + 1 + 2 - 1 - 2
    means = g.means.data
    # kept: A, E; then A's clone; then B's two children (B itself, C and D are gone)
    assert torch.equal(means[0], a) and torch.equal(means[1], e) and torch.equal(means[2], a)
    children = means[3:]
    assert torch.allclose(g.scales[3:], torch.full((2, 3), 0.1 / 1.6))
    assert float((children - b).norm(dim=-1).max()) < 5 * 0.1  # samples of B itself
    assert torch.equal(g.f_dc.data[3], b_colour) and torch.equal(g.f_dc.data[4], b_colour)
    assert torch.equal(g.f_rest.data, rest[[0, 4, 0, 1, 1]])  # the view-dependent colour follows the rows
    assert torch.allclose(g.opacities[3:], torch.tensor([0.6, 0.6]))
    assert g.grad_accum.shape == (5,) and float(g.grad_accum.abs().sum()) == 0  # statistics start afresh


def test_cold_set_is_untouched_and_threshold_is_inclusive() -> None:
    g = _hand_built()
    g.grad_accum[:] = 0
    g.logit_opacities.data[:] = logit(0.5)
    g.log_scales.data[3] = math.log(0.3)  # under 0.1 x extent
    counts = g.densify_and_prune(None, 0.01, EXTENT, PERCENT_DENSE, 0.01, 0.1, 0.0)
    assert counts == {"cloned": 0, "split": 0, "pruned": 0} and len(g) == 5
    g.grad_accum[0], g.grad_count[0] = 0.02, 2.0  # mean exactly at the threshold: densified (3DGS: >=)
    assert g.densify_and_prune(None, 0.01, EXTENT, PERCENT_DENSE, 0.01, 0.1, 0.0)["cloned"] == 1


def test_screen_size_pruning_uses_the_largest_radius_seen() -> None:
    g = _hand_built()
    g.grad_accum[:] = 0
    g.max_radii[:] = torch.tensor([1.0, 30.0, 2.0, 3.0, 25.0])
    g.logit_opacities.data[:] = logit(0.5)
    g.log_scales.data[3] = math.log(0.3)
    counts = g.densify_and_prune(None, 0.01, EXTENT, PERCENT_DENSE, 0.01, 0.1, prune_screen_size=20.0)
    assert counts["pruned"] == 2 and len(g) == 3


def test_adam_moments_follow_the_rows() -> None:
    g = _hand_built()
    opt = torch.optim.Adam([{"params": [p], "lr": 0.01} for _, p in g.named_groups()], eps=1e-15)
    _step(g, opt)
    before = {name: opt.state[p]["exp_avg"].clone() for name, p in g.named_groups()}
    g.densify_and_prune(opt, 0.01, EXTENT, PERCENT_DENSE, 0.01, 0.1, 0.0, torch.Generator().manual_seed(0))
    for name, p in g.named_groups():
        state = opt.state[p]
        assert opt.param_groups[NAMES_INDEX[name]]["params"][0] is p  # the groups hold the same parameters
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert torch.equal(state["exp_avg"][0], before[name][0]) and torch.equal(state["exp_avg"][1], before[name][4])
        assert float(state["exp_avg"][2:].abs().sum()) == 0 and float(state["exp_avg_sq"][2:].abs().sum()) == 0
    _step(g, opt)  # and Adam steps on the new rows
    assert all(opt.state[p]["exp_avg"].shape == p.shape for _, p in g.named_groups())


NAMES_INDEX = {name: i for i, name in enumerate(NAMES)}


def test_opacity_reset_caps_at_0_01_and_zeroes_its_moments() -> None:
    g = _hand_built()
    opt = torch.optim.Adam([p for _, p in g.named_groups()], lr=0.01)
    _step(g, opt)
    low = float(g.opacities[2].detach())
    g.reset_opacity(opt)
    assert torch.allclose(g.opacities[[0, 1, 3, 4]], torch.full((4,), 0.01), atol=1e-7)
    assert float(g.opacities[2].detach()) == pytest.approx(low)  # already below: unchanged
    state = opt.state[g.logit_opacities]
    assert float(state["exp_avg"].abs().sum()) == 0 and float(state["exp_avg_sq"].abs().sum()) == 0
    assert float(opt.state[g.means]["exp_avg"].abs().sum()) > 0  # other groups keep theirs


def test_state_round_trip_resizes_in_place() -> None:
    g = _hand_built()
    g.densify_and_prune(None, 0.01, EXTENT, PERCENT_DENSE, 0.01, 0.1, 0.0, torch.Generator().manual_seed(0))
    other = Gaussians.empty(7)
    means = other.means
    other.load_state_dict(g.state_dict())
    assert other.means is means and len(other) == len(g)
    for name, p in g.named_groups():
        assert torch.equal(getattr(other, name), p)
    # a checkpoint from before the higher degrees (no f_rest): the set keeps its degree, zero coefficients
    old = {k: v for k, v in g.state_dict().items() if k != "f_rest"}
    again = Gaussians.empty(7, sh_degree=1)
    again.load_state_dict(old)
    assert again.f_rest.shape == (len(g), 3, 3) and float(again.f_rest.detach().abs().sum()) == 0
    again.densify_and_prune(None, 0.0, EXTENT, PERCENT_DENSE, 0.0, 0.0, 0.0)  # the rows stay in step


def test_opacity_field_is_the_dense_sum_within_each_box() -> None:
    """The field's chunked, Morton-ordered evaluation (only the Gaussians reaching a chunk) equals the dense
    sum over every Gaussian, each counted within its box of 3 largest standard deviations, at any chunk size."""
    gen = torch.Generator().manual_seed(3)
    n = 300
    means = torch.rand(n, 3, generator=gen) * 1.6 - 0.8
    log_scales = torch.log(torch.rand(n, 3, generator=gen) * 0.08 + 0.01)
    quats = torch.randn(n, 4, generator=gen)
    opac = torch.rand(n, generator=gen) * 0.9 + 0.05
    g = Gaussians(means, log_scales, quats, logit(opac), torch.randn(n, 3, generator=gen))
    points = torch.rand(1500, 3, generator=gen) * 2 - 1
    d = points[:, None, :] - means[None]
    from threed.render.splat import quaternion_to_rotation
    local = torch.einsum("pgi,gij->pgj", d, quaternion_to_rotation(quats)) / torch.exp(log_scales)
    reach = 3 * torch.exp(log_scales).max(dim=1).values
    w = opac * torch.exp(-0.5 * local.square().sum(-1)) * (d.abs() < reach[None, :, None]).all(-1)
    density = w.sum(1)
    color = torch.where(density[:, None] > 1e-8, (w @ g.colors) / density.clamp_min(1e-30)[:, None], 0.5)
    for chunk in (29, 4096):
        got_density, got_color = g.field(points, chunk=chunk)
        assert torch.allclose(got_density, density, atol=1e-6, rtol=1e-5)
        assert torch.allclose(got_color, color, atol=1e-5)
    assert int((density > 0).sum()) > 500  # the points do meet Gaussians
