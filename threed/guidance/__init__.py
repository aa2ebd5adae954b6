"""The guidance: each prior scores a batch of renders and returns its loss (the Guidance interface:
`guidance(rgb, cameras, step, shading, background, ...) -> {"loss": ..., statistics}`).

Every guidance class takes the same two arguments, `(cfg: Config, device: str)`: the whole run config, of
which it reads its own `guidance.<section>` and what else it needs (prompt, cameras, render, seed). They are
built through the prior registry (threed/priors.py), never imported by the config.

- stable_diffusion.py, oracle.py, clip.py: the priors; sds.py: the score-distillation update they share.
- vsd.py: ProlificDreamer's variational score distillation over either diffusion prior.
- hub.py: finding pretrained weights (a local folder or a Hugging Face hub id); compile.py: torch.compile.
"""
