"""DMTet whose SDF and vertex offsets are a network's outputs at the grid vertices (threestudio's implicit-sdf).

Fantasia3D's geometry is not one free SDF value per grid vertex (threed/fields/dmtet.py, Magic3D's and
ProlificDreamer's refinement) but a hash grid with two small MLPs, read at the tetrahedral grid's vertices:

    sdf(v)    = start(v) + mlp_sdf(encoding(v))          start: the sphere or guide mesh (fields/sdf_init.py)
    offset(v) = max_offset * tanh(mlp_deformation(encoding(v)))

Why it matters: a normal map's gradient reaches only the few grid vertices at the ends of the crossing edges
under each pixel. With one free value per vertex each moves alone, and a normal-map loss, which sees slopes
and not positions, is as well served by a wrinkle as by a fold: the surface wrinkles instead of moving (a
sphere drawn toward a peanut's waist stopped at 5% Chamfer-L1). Through the hash grid's coarse levels and the
shared MLP every update moves a neighbourhood together, so the slopes the normal maps ask for become a
displacement of the surface.

The start is kept as a fixed term and the networks' last layers start at zero (threestudio's `sdf_bias`, its
alternative to fitting the network to the start by 1000 Adam steps): the first surface is exactly the
initialiser's, at no cost. Each step the network is evaluated at every grid vertex without gradients (for
the signs), then again with gradients at the crossing edges' ends only: the only vertices whose values
the mesh depends on, so the gradients are the same as a full evaluation's at a fraction of its cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from threed.config import FieldConfig
from threed.fields.dmtet import DMTetGeometry, marching_tetrahedra
from threed.fields.hashgrid_backend import make_hashgrid
from threed.fields.nerf import field_mlp
from threed.fields.tetgrid import TetGrid

CHUNK = 65536
BAND = 2  # grid steps around the crossing edges' ends re-evaluated each step when `refresh` > 1


class NeuralDMTetGeometry(DMTetGeometry):
    """DMTetGeometry with the SDF and offsets from a hash grid and two MLPs (see the module docstring).

    `sdf` holds the start's values (a buffer now, not trained); the trained parameters are `encoding`,
    `sdf_mlp` and `deformation_mlp` (`optim_groups`).

    `refresh`: with 1, every training step evaluates the network at every vertex (exact; cheap on a GPU). With
    n > 1 (for a CPU, where the every-vertex pass costs most of a step: 0.8 s of CPU time at resolution 64),
    every vertex is evaluated once in n steps and the steps between re-evaluate only the band within BAND
    grid steps of the crossing edges' ends (with gradients: the same gradients, as the mesh reads only the
    vertices next to the surface), keeping older values farther out; should the surface reach the band's edge,
    that step starts again from every vertex. Without gradients (export, previews) every vertex is always
    evaluated; a geometry with nothing to train (the appearance stage's) is evaluated once."""

    def __init__(self, grid: TetGrid, field: FieldConfig, bound: float, deform: bool = True,
                 deform_scale: float = 1.0, refresh: int = 1, device: torch.device | str = "cpu"):
        super().__init__(grid, deform=False, deform_scale=deform_scale, device=device)
        self.refresh = max(1, int(refresh))
        self._cache: tuple[Tensor, Tensor | None] | None = None  # every vertex's values, as last evaluated
        self._since = 0  # training evaluations since the cache was filled
        start = self.sdf.detach().clone()
        del self.sdf
        self.register_buffer("sdf", start)
        self.bound = float(bound)
        self.encoding, self.backend = make_hashgrid(field, device)
        self.sdf_mlp = field_mlp(field, self.encoding.output_dim, 1, device)
        self.deformation_mlp = field_mlp(field, self.encoding.output_dim, 3, device) if deform else None
        with torch.no_grad():
            for mlp in (self.sdf_mlp, self.deformation_mlp):
                if mlp is not None:
                    mlp[-1].weight.zero_()
                    mlp[-1].bias.zero_()

    def optim_groups(self) -> dict[str, list[Tensor]]:
        groups = {"sdf": list(self.encoding.parameters()) + list(self.sdf_mlp.parameters())}
        if self.deformation_mlp is not None:
            groups["deformation"] = list(self.deformation_mlp.parameters())
        return groups

    def _outputs(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """(sdf (n,), pre-tanh offsets (n, 3) or None) at the grid vertices `ids`."""
        points = self.grid.positions(ids)
        features = self.encoding(((points / self.bound + 1.0) * 0.5).clamp(0.0, 1.0))
        sdf = self.sdf[ids] + self.sdf_mlp(features)[:, 0].to(self.sdf.dtype)
        offsets = None if self.deformation_mlp is None else self.deformation_mlp(features).float()
        return sdf, offsets

    def _full(self) -> tuple[Tensor, Tensor | None]:
        """Every vertex's (sdf, offsets), without gradients, in chunks."""
        device = self.sdf.device
        with torch.no_grad():
            parts = [self._outputs(torch.arange(s, min(s + CHUNK, self.grid.num_vertices), device=device))
                     for s in range(0, self.grid.num_vertices, CHUNK)]
            sdf = torch.cat([p[0] for p in parts])
            sdf = torch.where(self.boundary, sdf.clamp(min=self.grid.cell_size), sdf)
            return sdf, None if self.deformation_mlp is None else torch.cat([p[1] for p in parts])

    def _ends(self, sdf: Tensor) -> Tensor:
        """The vertices at the ends of the edges whose signs differ."""
        crossing = self.grid.crossing_edges(self.grid.lattice(sdf.detach() < 0)).nonzero().squeeze(1)
        return torch.unique(torch.cat(self.grid.edge_endpoints(crossing)))

    def _values(self, retry: bool = True) -> tuple[Tensor, Tensor | None]:
        """The SDF (boundary held outside) and offsets at every vertex, with gradients where the mesh reads them
        (see the class docstring for `refresh`)."""
        if not torch.is_grad_enabled():  # export, previews: always every vertex, exactly
            return self._full()
        if not any(p.requires_grad for p in self.parameters()):  # a kept surface (appearance): once
            if self._cache is None or self._since >= 0:
                self._cache, self._since = self._full(), -1
            return self._cache
        if self._cache is None or self._since >= self.refresh:
            self._cache, self._since = self._full(), 0
        self._since += 1
        sdf, offsets = self._cache
        ids = self._ends(sdf)
        if self.refresh > 1:  # the band: the current crossing edges' ends and the vertices BAND cells around
            near_surface = torch.zeros(self.grid.num_vertices, device=sdf.device)
            near_surface[ids] = 1.0
            band = torch.nn.functional.max_pool3d(self.grid.lattice(near_surface)[None, None], 2 * BAND + 1, 1, BAND)
            ids = band.reshape(-1).nonzero().squeeze(1)
        near, near_offsets = self._outputs(ids)
        near = torch.where(self.boundary[ids], near.clamp(min=self.grid.cell_size), near)
        if self.refresh > 1:
            outside = ~torch.isin(self._ends(sdf.index_put((ids,), near.detach())), ids)
            if retry and bool(outside.any()):  # the surface left the band: start again from every vertex
                self._cache = None
                return self._values(retry=False)
            sdf.index_put_((ids,), near.detach())  # the cache follows the band
            if offsets is not None:
                offsets.index_put_((ids,), near_offsets.detach())
        sdf = sdf.index_put((ids,), near)
        if offsets is not None:
            offsets = offsets.index_put((ids,), near_offsets)
        return sdf, offsets

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        self._cache = None
        return super().load_state_dict(state, strict=strict, assign=assign)

    def closed_sdf(self) -> Tensor:
        return self._values()[0]

    def extract(self) -> tuple[Tensor, Tensor]:
        sdf, offsets = self._values()
        return marching_tetrahedra(self.grid, sdf, offsets, self.max_offset)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], device: torch.device | str = "cpu",
                        field: FieldConfig | None = None, bound: float = 1.0, **kwargs) -> "NeuralDMTetGeometry":
        grid = TetGrid(tuple(int(c) for c in state["grid_cells"].tolist()),
                       tuple(float(o) for o in state["grid_origin"].tolist()), float(state["grid_cell_size"]))
        assert field is not None, "a network SDF's state needs its field settings"
        deform = any(k.startswith("deformation_mlp.") for k in state)
        geometry = cls(grid, field, bound, deform=deform, device=device, **kwargs)
        geometry.load_state_dict(state)
        return geometry


def geometry_from_state(state: dict[str, Tensor], device: torch.device | str, field: FieldConfig, bound: float,
                        deform_scale: float, refresh: int = 1) -> DMTetGeometry:
    """The DMTet geometry a checkpoint's state holds: per-vertex values, or a network SDF (its `sdf_mlp`)."""
    if any(k.startswith("sdf_mlp.") for k in state):
        return NeuralDMTetGeometry.from_state_dict(state, device, field=field, bound=bound, deform_scale=deform_scale,
                                                   refresh=refresh)
    return DMTetGeometry.from_state_dict(state, device, deform_scale=deform_scale)
