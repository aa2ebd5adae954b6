"""threed/fields/neural_sdf.py: Fantasia3D's network SDF on the tetrahedral grid starts as its initialiser's
surface, and its banded evaluation (geometry.sdf_network_refresh > 1) gives the exact surface and gradients."""

from __future__ import annotations

import torch

from threed.config import FieldConfig
from threed.fields.dmtet import DMTetGeometry, marching_tetrahedra
from threed.fields.neural_sdf import NeuralDMTetGeometry, geometry_from_state
from threed.fields.tetgrid import TetGrid

FIELD = FieldConfig(n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32, hidden_dim=16)


def _geometry(refresh: int, seed: int = 0) -> NeuralDMTetGeometry:
    torch.manual_seed(seed)
    grid = TetGrid.cube(16, 1.0)
    geometry = NeuralDMTetGeometry(grid, FIELD, 1.0, refresh=refresh)
    geometry.set_sdf(grid.vertices().norm(dim=-1) - 0.5)
    return geometry


def test_starts_as_the_initial_sdf_and_round_trips():
    """The networks' last layers start at zero: the first surface is the start SDF's, bit for bit, as the
    per-vertex geometry gives it; a saved state rebuilds the same surface."""
    neural = _geometry(1)
    plain = DMTetGeometry(neural.grid)
    plain.set_sdf(neural.sdf)
    v, f = neural.extract()
    pv, pf = plain.extract()
    assert torch.equal(f, pf) and torch.allclose(v, pv, atol=0, rtol=0)
    assert set(neural.optim_groups()) == {"sdf", "deformation"}
    with torch.no_grad():  # move it off the start
        for p in neural.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    again = geometry_from_state(neural.state_dict(), "cpu", FIELD, 1.0, 1.0)
    assert isinstance(again, NeuralDMTetGeometry)
    with torch.no_grad():
        assert torch.equal(again.extract()[1], neural.extract()[1])


def _step(geometry: NeuralDMTetGeometry):
    """One training evaluation: (mesh vertices, faces, d loss / d every vertex's sdf, d loss / d offsets,
    parameter gradients) for a loss that weighs the mesh's coordinates differently."""
    geometry.zero_grad()
    sdf, offsets = geometry._values()
    sdf.retain_grad()
    offsets.retain_grad()
    v, f = marching_tetrahedra(geometry.grid, sdf, offsets, geometry.max_offset)
    (v * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    return v.detach(), f, sdf.grad, offsets.grad, [p.grad.clone() for p in geometry.parameters()]


def test_banded_steps_give_the_exact_surface_and_gradients():
    """Between two evaluations at every vertex (refresh 10) only the band around the surface is re-evaluated;
    after small parameter changes, and after a jump of the surface out of the band (which starts that step
    again from every vertex), the surface and the gradient reaching every vertex's values equal the
    every-vertex evaluation's (to float rounding: the network runs on other batches of points), so the
    parameters' gradients do too, to the rounding of sums over other sets of vertices (sums that largely
    cancel: measured at most 4e-8 of the sum of the values' absolute gradients; asked 1e-6, while one vertex
    left out would cost about 1e-3 of it)."""
    exact, banded = _geometry(1), _geometry(10)
    banded.load_state_dict(exact.state_dict())
    for step in range(4):
        a, b = _step(exact), _step(banded)
        assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)
        assert torch.allclose(a[2], b[2], atol=1e-4, rtol=1e-4) and torch.allclose(a[3], b[3], atol=1e-4, rtol=1e-4)
        scale = float(a[2].abs().sum() + a[3].abs().sum())  # what the parameters' gradients are sums of
        worst = max(float((ga - gb).abs().max()) for ga, gb in zip(a[4], b[4]))
        assert worst <= 1e-6 * scale
        with torch.no_grad():  # an optimiser's small step, the same on both; then a jump of 4 cells
            for pa, pb in zip(exact.parameters(), banded.parameters()):
                delta = 1e-3 * torch.sign(pa.grad)
                pa.sub_(delta)
                pb.sub_(delta)
            if step == 2:
                for g in (exact, banded):
                    g.sdf_mlp[-1].bias.sub_(4 * g.grid.cell_size)
