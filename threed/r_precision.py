"""CLIP R-precision (DreamFusion, after Park et al. 2021): does a result retrieve its own prompt?

For each result, the cosine similarity between its rendered views and every prompt of the benchmark
is averaged over the views; the prompts are ranked by it, and the result is a hit when its true
prompt is among the top k. R-precision is the fraction of hits. With P prompts, chance is k / P.
The evaluator CLIP must differ from any CLIP used for guidance, else the score is inflated: the
result was optimised against the very model that grades it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threed.clip_models import MeanStd, Tokenizer, encode_images, encode_texts


def prompt_similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """(R, V, D) view embeddings, (P, D) prompt embeddings -> (R, P) cosine similarity averaged over views."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    return torch.einsum("rvd,pd->rvp", img, txt).mean(dim=1)


def prompt_ranks(image_emb: Tensor, text_emb: Tensor, true_prompt: Tensor) -> Tensor:
    """0-based rank of each result's true prompt; ties count against the result (a prompt scoring the
    same as the true one is ranked above it), so a constant embedding never scores a hit by luck."""
    sim = prompt_similarity(image_emb, text_emb)
    true_prompt = torch.as_tensor(true_prompt, dtype=torch.long)
    true_sim = sim.gather(1, true_prompt[:, None])
    others = torch.ones_like(sim, dtype=torch.bool)
    others[torch.arange(sim.shape[0]), true_prompt] = False
    return ((sim >= true_sim) & others).sum(dim=1)


def r_precision(image_emb: Tensor, text_emb: Tensor, true_prompt: Tensor | Sequence[int], k: int = 1) -> float:
    """Fraction of results whose true prompt ranks in the top `k` of all P prompts.

    image_emb (R, V, D): per result, per view; text_emb (P, D); true_prompt (R,) indices into text_emb.
    """
    image_emb, text_emb = torch.as_tensor(image_emb), torch.as_tensor(text_emb)
    true_prompt = torch.as_tensor(true_prompt, dtype=torch.long)
    if image_emb.dim() != 3 or text_emb.dim() != 2 or image_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"expected image_emb (R, V, D) and text_emb (P, D), got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if true_prompt.shape != (image_emb.shape[0],):
        raise ValueError(f"true_prompt must have shape ({image_emb.shape[0]},), got {tuple(true_prompt.shape)}")
    if image_emb.shape[0] == 0:
        return float("nan")
    return float((prompt_ranks(image_emb, text_emb, true_prompt) < k).float().mean())


@torch.no_grad()
def clip_embed_images(model: nn.Module, mean_std: MeanStd, images: np.ndarray | Tensor, batch_size: int = 16) -> Tensor:
    """Unit evaluator embeddings (N, D) of (N, H, W, 3) images, uint8 or float in [0, 1]."""
    device = mean_std[0].device
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    out = [encode_images(model, mean_std, x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def clip_embed_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str]) -> Tensor:
    """Unit evaluator embeddings (P, D) of the prompts, on the CPU."""
    return encode_texts(model, tokenizer, texts).cpu()
