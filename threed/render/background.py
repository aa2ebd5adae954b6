"""Backgrounds behind the object: a learned colour per view direction, a fixed colour, a random one, or white or
black at random (DreamGaussian's).

A learned background lets the prior explain "sky" without growing geometry for it; a fixed colour is what
the oracle prior and mesh-quality tests need (the reference is rendered over the same colour). With
`random_aug` = p > 0, a training render's background is, with probability p, one random colour per image
instead (threestudio's random_aug, one draw per render as there): the object must stand out against any
colour, not only against the background learned with it. `random_aug_shared`: one colour for the whole batch
(threestudio's share_aug_bg, as MVDream's views of one object share it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from threed.config import RenderConfig


class Background(nn.Module):
    def __init__(self, cfg: RenderConfig, n_frequencies: int = 3, hidden: int = 32):
        super().__init__()
        self.kind = cfg.background
        self.random_aug = cfg.random_aug  # probability per training render (see the module docstring)
        self.random_aug_shared = cfg.random_aug_shared  # one colour for the whole batch (MVDream's views)
        self.register_buffer("color", torch.tensor(cfg.background_color, dtype=torch.float32))
        self.n_frequencies = n_frequencies
        self.mlp = None
        if self.kind == "mlp":
            in_dim = 3 + 6 * n_frequencies
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def take_from(self, state: dict) -> None:
        """Load another background's state where it is of this kind (a stage's copy of the stage before's);
        a stage with a background kind of its own (mesh.background) keeps its fresh one."""
        if set(state) == set(self.state_dict()):
            self.load_state_dict(state)

    def _encode(self, dirs: Tensor) -> Tensor:
        freqs = 2.0 ** torch.arange(self.n_frequencies, device=dirs.device, dtype=dirs.dtype)
        angles = dirs[..., None] * freqs  # (..., 3, F)
        return torch.cat([dirs, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], dim=-1)

    @staticmethod
    def _random_colours(dirs: Tensor, generator: torch.Generator | None, shared: bool = False) -> Tensor:
        """One uniform random colour per image (or one for the batch), (B, H, W, 3)."""
        n = 1 if shared else dirs.shape[0]
        return torch.rand(n, 1, 1, 3, generator=generator).to(dirs.device).expand_as(dirs)

    def forward(self, dirs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """dirs (B, H, W, 3) unit view directions -> colours (B, H, W, 3) in [0, 1]."""
        if self.training and self.random_aug > 0 and torch.rand((), generator=generator).item() < self.random_aug:
            return self._random_colours(dirs, generator, self.random_aug_shared)
        if self.kind == "mlp":
            assert self.mlp is not None
            return torch.sigmoid(self.mlp(self._encode(dirs)))
        if self.kind == "random" and self.training:
            return self._random_colours(dirs, generator)
        if self.kind == "white_or_black" and self.training:  # one coin per render, as DreamGaussian's bg_color
            black = torch.rand((), generator=generator).item() < 0.5
            return torch.full_like(dirs, 0.0 if black else 1.0)
        return self.color.to(dirs.device).expand_as(dirs)
