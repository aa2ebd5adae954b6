"""A set of 3D Gaussians as 3DGS and DreamGaussian train them: parameters, ball start, densification, pruning.

Parameters (one row per Gaussian): position, log-scale (3 axes), rotation quaternion (w, x, y, z; normalised
when used), logit opacity, degree-0 spherical-harmonic colour (`f_dc`; colour = 0.5 + C0 f_dc) and the higher
degrees' coefficients (`f_rest`, (degree + 1)² - 1 rows per Gaussian, none at degree 0: view-dependent colour,
threed/render/spherical_harmonics.py). Each is one optimiser group with its own learning rate
(threed/scenes/gaussians.py builds the groups).

Adaptive density control (Kerbl et al. 2023, section 5), on DreamGaussian's schedule:
- after every training step, each Gaussian seen in a view adds the norm of the loss's gradient with respect
  to its projected mean in normalised device coordinates (pixels x W/2, H/2: the CUDA rasterizer's
  `means2D` gradient) to its accumulator, and its count goes up by one;
- every `densify_every` steps between `densify_from` and `densify_until`, Gaussians whose mean accumulated
  gradient reaches `grad_threshold` are cloned when small (largest scale <= percent_dense x extent: a copy in
  place) or split when large (two samples from the Gaussian itself, scales / 1.6, the original removed); then
  Gaussians with opacity below `min_opacity`, larger than `prune_world_size` x extent, or (with
  `prune_screen_size` > 0) seen larger than that many pixels are pruned, and the statistics start afresh;
- every `opacity_reset_every` steps every opacity is lowered to at most 0.01.

Parameters keep their identity when rows are added or removed (their `.data` is replaced), and Adam's moments
follow the rows: copied rows start with zero moments, removed rows take theirs with them, reset opacities get
zero moments (3DGS's `replace_tensor_to_optimizer`). The optimiser's param groups never change.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from threed.render.spherical_harmonics import coefficients, sh_to_rgb
from threed.render.splat import quaternion_to_rotation, rgb_to_sh0, sh0_to_rgb

NAMES = ("means", "log_scales", "quaternions", "logit_opacities", "f_dc", "f_rest")


def logit(p: float | Tensor) -> Tensor:
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p / (1 - p))


def nearest_neighbour_scale(points: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """(N,) the root of the mean squared distance to each point's `k` nearest others (3DGS's distCUDA2 start
    scale), floored at sqrt(1e-7)."""
    out = []
    for start in range(0, len(points), chunk):
        d2 = torch.cdist(points[start:start + chunk], points).square()
        d2[torch.arange(d2.shape[0]), torch.arange(start, start + d2.shape[0])] = float("inf")
        k_eff = min(k, len(points) - 1)
        out.append(d2.topk(k_eff, dim=1, largest=False).values.mean(dim=1) if k_eff > 0 else
                   torch.full((d2.shape[0],), 1e-7))
    return torch.cat(out).clamp_min(1e-7).sqrt()


def morton_order(points: Tensor, bits: int = 10) -> Tensor:
    """The permutation that sorts (M, 3) points along a Z-order curve over their bounding box (2^bits cells a
    side): consecutive points in it are near each other in space."""
    lo = points.min(dim=0).values
    span = (points.max(dim=0).values - lo).clamp_min(1e-12)
    cells = ((points - lo) / span * (2 ** bits - 1)).round().long()
    code = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    for bit in range(bits):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return torch.argsort(code)


class Gaussians(nn.Module):
    """N Gaussians (see the module docstring); the densification statistics are buffers, so a checkpoint
    resumes them exactly."""

    def __init__(self, means: Tensor, log_scales: Tensor, quaternions: Tensor, logit_opacities: Tensor,
                 f_dc: Tensor, f_rest: Tensor | None = None):
        super().__init__()
        self.means = nn.Parameter(means.float())
        self.log_scales = nn.Parameter(log_scales.float())
        self.quaternions = nn.Parameter(quaternions.float())
        self.logit_opacities = nn.Parameter(logit_opacities.float())
        self.f_dc = nn.Parameter(f_dc.float())
        n = means.shape[0]
        self.f_rest = nn.Parameter(torch.zeros(n, 0, 3) if f_rest is None else f_rest.float())
        self.register_buffer("grad_accum", torch.zeros(n))
        self.register_buffer("grad_count", torch.zeros(n))
        self.register_buffer("max_radii", torch.zeros(n))

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def ball(cls, n: int, radius: float, opacity: float, generator: torch.Generator, sh_degree: int = 0
             ) -> "Gaussians":
        """DreamGaussian's start: `n` points uniform in a ball of `radius`, isotropic with the nearest-
        neighbour scale, identity rotation, `opacity`, colour a grey of 0.5 + C0 x U[0, 1/255) (the higher
        degrees' coefficients zero, as 3DGS starts them)."""
        u = torch.rand(n, 3, generator=generator)
        phi, cos_theta = 2 * math.pi * u[:, 0], 2 * u[:, 1] - 1
        sin_theta = (1 - cos_theta ** 2).clamp_min(0).sqrt()
        r = radius * u[:, 2].pow(1.0 / 3.0)
        means = torch.stack([r * sin_theta * torch.cos(phi), r * sin_theta * torch.sin(phi), r * cos_theta], dim=-1)
        return cls._isotropic(means, torch.rand(n, 3, generator=generator) / 255.0, opacity, sh_degree)

    @classmethod
    def from_points(cls, means: Tensor, colors: Tensor | None, opacity: float, sh_degree: int = 0) -> "Gaussians":
        """Gaussians at given points (a user's mesh or point cloud, threed/fields/gaussian_init.py), started as
        the ball's are; `colors` (N, 3) in [0, 1], or None for the ball's grey."""
        f_dc = rgb_to_sh0(colors.float()) if colors is not None else torch.zeros(means.shape[0], 3)
        return cls._isotropic(means, f_dc, opacity, sh_degree)

    @classmethod
    def _isotropic(cls, means: Tensor, f_dc: Tensor, opacity: float, sh_degree: int) -> "Gaussians":
        """Gaussians at `means` with colour `f_dc` (the higher degrees' zero), isotropic at the nearest-neighbour
        scale, identity rotation and `opacity`: how every start sets them."""
        n = means.shape[0]
        log_scales = torch.log(nearest_neighbour_scale(means.float()))[:, None].repeat(1, 3)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        return cls(means, log_scales, quats, logit(opacity).expand(n).clone(), f_dc,
                   torch.zeros(n, coefficients(sh_degree), 3))

    @classmethod
    def empty(cls, n: int = 0, sh_degree: int = 0) -> "Gaussians":
        """`n` rows of zeros, to be filled by `load_state_dict`."""
        return cls(torch.zeros(n, 3), torch.zeros(n, 3), torch.zeros(n, 4), torch.zeros(n), torch.zeros(n, 3),
                   torch.zeros(n, coefficients(sh_degree), 3))

    # -- values ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.means.shape[0]

    def named_groups(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, getattr(self, name)) for name in NAMES]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.logit_opacities)

    @property
    def colors(self) -> Tensor:
        """(N, 3) the colours without view dependence (degree 0): the mesh's, the texture fit's."""
        return sh0_to_rgb(self.f_dc)

    def colors_seen_from(self, centres: Tensor, degree: int) -> Tensor:
        """(B, N, 3) each Gaussian's colour seen from each of (B, 3) camera centres, with the spherical
        harmonics up to `degree` (at most the set's own)."""
        return sh_to_rgb(self.f_dc, self.f_rest, self.means[None] - centres[:, None].to(self.means), degree)

    def load_state_dict(self, state: dict, strict: bool = True):  # type: ignore[override]
        """Rows resized to the checkpoint's count (parameters keep their identity: an optimiser built on them
        stays valid). A checkpoint written before the higher spherical-harmonic degrees existed has no `f_rest`:
        the set keeps its own degree, with zero coefficients."""
        for name, tensor in state.items():
            current = getattr(self, name)
            current.data = tensor.detach().to(current.device, current.dtype).clone()
        if "f_rest" not in state:
            self.f_rest.data = self.f_rest.data.new_zeros(len(self), *self.f_rest.shape[1:])
        return None

    # -- the summed opacity field (mesh extraction) -----------------------------------------------------
    @torch.no_grad()
    def field(self, points: Tensor, min_opacity: float = 0.005, chunk: int = 128) -> tuple[Tensor, Tensor]:
        """At (M, 3) points: the summed opacity field Σ o_i exp(-½ dᵀ Σ_i⁻¹ d) (DreamGaussian's
        `extract_fields`, Gaussians above `min_opacity` only) and the colour it weights, Σ w_i c_i / Σ w_i
        (grey where the field is empty). Each Gaussian counts within 3 of its largest standard deviations
        along each axis (beyond, its weight is below 1.2% of its opacity). The points go `chunk` at a time in
        Morton order, so that each chunk is a small cluster of space that few Gaussians reach: only those are
        evaluated there (the result does not depend on the order or the chunk)."""
        keep = self.opacities > min_opacity
        means, opac, colors = self.means[keep], self.opacities[keep], self.colors[keep]
        rot = quaternion_to_rotation(self.quaternions[keep])
        inv_scales = torch.exp(-self.log_scales[keep])
        reach = 3.0 * self.scales[keep].max(dim=1).values
        density = points.new_zeros(points.shape[0])
        color = points.new_full((points.shape[0], 3), 0.5)
        if points.shape[0] == 0 or means.shape[0] == 0:
            return density, color
        order = morton_order(points)
        for start in range(0, points.shape[0], chunk):
            rows = order[start:start + chunk]
            p = points[rows]
            lo, hi = p.min(dim=0).values, p.max(dim=0).values
            near = ((means + reach[:, None] > lo) & (means - reach[:, None] < hi)).all(dim=1)
            if not bool(near.any()):
                continue
            idx = near.nonzero().squeeze(1)
            d = p[:, None, :] - means[idx][None]  # (P, G, 3)
            inside = (d.abs() < reach[idx][None, :, None]).all(dim=-1)  # the point within the Gaussian's box
            local = torch.einsum("pgi,gij->pgj", d, rot[idx]) * inv_scales[idx]  # Rᵀ d / s per axis
            w = torch.where(inside, opac[idx] * torch.exp(-0.5 * local.square().sum(-1)), torch.zeros(()))
            total = w.sum(dim=1)
            density[rows] = total
            filled = total > 1e-8
            color[rows[filled]] = (w[filled] @ colors[idx]) / total[filled, None]
        return density, color

    # -- adaptive density control ---------------------------------------------------------------------
    @torch.no_grad()
    def add_stats(self, means2d: list[Tensor] | Tensor, radii: Tensor, width: int, height: int) -> None:
        """Accumulate, per view, the NDC-space gradient norm of each visible Gaussian's projected mean, and
        its largest radius seen (pixels). `means2d`: per view an (N, 2) tensor of pixel means (threed's
        rasterizer) or one (B, N, 2) tensor (gsplat's), their gradients kept by backward."""
        scale = torch.tensor([0.5 * width, 0.5 * height], device=self.means.device)
        if isinstance(means2d, Tensor):
            grads = list(means2d.grad) if means2d.grad is not None else [None] * len(radii)
        else:
            grads = [view.grad for view in means2d]
        for grad, r in zip(grads, radii):
            if grad is None:
                continue
            seen = r > 0
            self.grad_accum[seen] += (grad[seen] * scale).norm(dim=-1)
            self.grad_count[seen] += 1
            self.max_radii[seen] = torch.maximum(self.max_radii[seen], r[seen].to(self.max_radii.dtype))

    def _edit(self, optimizer: torch.optim.Optimizer | None, fn: Callable[[Tensor, bool], Tensor]) -> None:
        """Apply a row edit to every parameter (`fn(t, False)`) and its Adam moments (`fn(t, True)`: rows
        added are zeros there)."""
        for _, param in self.named_groups():
            param.data = fn(param.data, False)
            param.grad = None
            state = optimizer.state.get(param) if optimizer is not None else None
            if state:
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in state:
                        state[key] = fn(state[key], True)

    def _append(self, optimizer: torch.optim.Optimizer | None, rows: dict[str, Tensor]) -> None:
        """Add `rows` (one tensor per parameter name); their Adam moments start at zero."""
        count = rows["means"].shape[0]
        for name in NAMES:
            param = getattr(self, name)
            param.data = torch.cat([param.data, rows[name].to(param.device, param.dtype)])
            param.grad = None
            state = optimizer.state.get(param) if optimizer is not None else None
            if state:
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in state:
                        state[key] = torch.cat([state[key], state[key].new_zeros(count, *state[key].shape[1:])])
        self._resize_stats()

    def _keep(self, optimizer: torch.optim.Optimizer | None, keep: Tensor) -> None:
        self._edit(optimizer, lambda t, moment: t[keep])
        self.grad_accum, self.grad_count, self.max_radii = self.grad_accum[keep], self.grad_count[keep], self.max_radii[keep]

    def _resize_stats(self) -> None:
        n = len(self)
        self.grad_accum = torch.zeros(n, device=self.means.device)
        self.grad_count = torch.zeros(n, device=self.means.device)
        self.max_radii = torch.zeros(n, device=self.means.device)

    def _rows(self, mask: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, name).data[mask] for name in NAMES}

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer | None, grad_threshold: float, extent: float,
                          percent_dense: float, min_opacity: float, prune_world_size: float,
                          prune_screen_size: float, generator: torch.Generator | None = None) -> dict[str, int]:
        """Clone, split, prune (see the module docstring); returns how many Gaussians each step touched."""
        grads = self.grad_accum / self.grad_count
        grads = torch.nan_to_num(grads, nan=0.0)
        big = self.scales.max(dim=1).values > percent_dense * extent
        hot = grads >= grad_threshold
        clone, split = hot & ~big, hot & big
        n_clone, n_split = int(clone.sum()), int(split.sum())
        # clone: copies in place
        cloned = self._rows(clone)
        # split: two samples each from the Gaussian itself, scales / (0.8 x 2)
        parent = self._rows(split)
        scales = torch.exp(parent["log_scales"]).repeat(2, 1)
        noise = torch.randn(scales.shape, generator=generator).to(scales.device) * scales
        rot = quaternion_to_rotation(parent["quaternions"]).repeat(2, 1, 1)
        children = {
            "means": (rot @ noise[..., None])[..., 0] + parent["means"].repeat(2, 1),
            "log_scales": torch.log(scales / (0.8 * 2)),
            "quaternions": parent["quaternions"].repeat(2, 1),
            "logit_opacities": parent["logit_opacities"].repeat(2),
            "f_dc": parent["f_dc"].repeat(2, 1),
            "f_rest": parent["f_rest"].repeat(2, 1, 1),
        }
        n_before = len(self)
        new_rows = {k: torch.cat([cloned[k], children[k]]) for k in NAMES}
        max_radii = torch.cat([self.max_radii, self.max_radii.new_zeros(n_clone + 2 * n_split)])
        self._append(optimizer, new_rows)
        # the split parents go; then the transparent and the too large (3DGS resets the screen radii with
        # the statistics before this check, so its `max_screen_size` prunes nothing: see the config)
        remove = torch.zeros(len(self), dtype=torch.bool, device=self.means.device)
        remove[:n_before] = split
        prune = self.opacities < min_opacity
        if prune_world_size > 0:
            prune |= self.scales.max(dim=1).values > prune_world_size * extent
        if prune_screen_size > 0:
            prune |= max_radii > prune_screen_size
        n_pruned = int((prune & ~remove).sum())
        self._keep(optimizer, ~(remove | prune))
        self._resize_stats()
        return {"cloned": n_clone, "split": n_split, "pruned": n_pruned}

    @torch.no_grad()
    def reset_opacity(self, optimizer: torch.optim.Optimizer | None, ceiling: float = 0.01) -> None:
        """Every opacity lowered to at most `ceiling`, its Adam moments zeroed (3DGS)."""
        param = self.logit_opacities
        param.data = torch.minimum(param.data, logit(ceiling).to(param.device))
        state = optimizer.state.get(param) if optimizer is not None else None
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = torch.zeros_like(state[key])
