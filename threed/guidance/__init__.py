"""The guidance: each prior scores a batch of renders and returns its loss (the Guidance interface:
`guidance(rgb, cameras, step, shading, background, ...) -> {"loss": ..., statistics}`).

Every guidance class takes the same two arguments, `(cfg: Config, device: str)`: the whole run config, of
which it reads its own `guidance.<section>` and what else it needs (prompt, cameras, render, seed). They are
built through the prior registry (threed/priors.py), never imported by the config.

- stable_diffusion.py, oracle.py, clip.py: the priors; sds.py: the score-distillation update they share.
- vsd.py: ProlificDreamer's variational score distillation over either diffusion prior.
- sdedit.py: DreamGaussian's texture refinement, an MSE toward a diffusion prior's SDEdit edit of each render.
- hub.py: finding pretrained weights (a local folder or a Hugging Face hub id); compile.py: torch.compile.
"""

from __future__ import annotations

import torch


class RandomStream:
    """For a guidance whose only state between steps is its random stream (timesteps, noise, views,
    augmentations), drawn from `self.generator`: the stream goes into every checkpoint, so a resumed run
    draws exactly what an uninterrupted one would (the trainer saves `state_dict()` beside the scene's)."""

    generator: torch.Generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
