"""View-dependent prompts (DreamFusion) and their text embeddings, cached on disk.

A text-to-image prior sees one view at a time and, asked for "a duck", draws its front from every side
(the Janus problem). DreamFusion appends the camera's view ("front view", "back view", ...) to the
prompt. The few distinct texts are embedded once, at construction, and kept on the device; the embeddings
are also stored on disk, keyed by the model and the text, so a rerun does not load the text encoder's
work again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from threed.cameras import VIEWS, Cameras, view_indices, view_names
from threed.errors import UserError
from threed.io import atomic_torch_save, cache_root

if TYPE_CHECKING:
    from threed.config import CameraConfig


def cache_dir() -> Path:
    """`$THREED_CACHE/embeddings`, default `~/.cache/threed/embeddings`."""
    return cache_root() / "embeddings"


def cache_key(model_identity: str, text: str) -> str:
    return hashlib.sha256(f"{model_identity}\0{text}".encode()).hexdigest()


def view_prompt(prompt: str, view: str) -> str:
    return f"{prompt}, {view} view"


def check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError('the prompt is empty: pass --prompt "a yellow rubber duck"')
    return prompt


class EmbeddingCache:
    """One file per (model, text): `<sha256>.pt` holding a CPU float32 tensor. Unreadable files are misses."""

    def __init__(self, model_identity: str, directory: Path | None = None) -> None:
        self.model_identity = model_identity
        self.directory = directory if directory is not None else cache_dir()

    def path(self, text: str) -> Path:
        return self.directory / f"{cache_key(self.model_identity, text)}.pt"

    def load(self, text: str) -> Tensor | None:
        path = self.path(text)
        if not path.exists():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated or garbage file: recompute and overwrite
            return None
        if not isinstance(value, Tensor) or value.dim() != 2 or not torch.isfinite(value).all():
            return None
        return value

    def save(self, text: str, value: Tensor) -> None:
        try:
            atomic_torch_save(value.detach().float().cpu().contiguous(), self.path(text))
        except OSError:  # a read-only cache slows reruns down but must not stop a run
            pass

    def get_or_compute(self, texts: list[str], encode: Callable[[list[str]], Tensor]) -> list[Tensor]:
        """Embeddings (L, D) for `texts`, calling `encode` once, on the misses only (if any)."""
        found = {t: self.load(t) for t in dict.fromkeys(texts)}
        missing = [t for t, v in found.items() if v is None]
        if missing:
            computed = encode(missing).detach().float().cpu()
            for text, value in zip(missing, computed):
                self.save(text, value)
                found[text] = value
        return [found[t] for t in texts]


class PromptEmbeddings:
    """Text embeddings of the prompt per view plus the negative prompt, resident on `device`.

    `encode(texts) -> (N, L, D)` is the prior's text encoder; `model_identity` keys the disk cache (see
    threed.guidance.hub.model_identity). An empty negative prompt is the unconditional embedding.
    """

    def __init__(self, prompt: str, negative_prompt: str, encode: Callable[[list[str]], Tensor],
                 model_identity: str, camera_cfg: CameraConfig, view_dependent: bool = True,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cache: EmbeddingCache | None = None) -> None:
        self.prompt = check_prompt(prompt)
        self.negative_prompt = (negative_prompt or "").strip()
        self.camera_cfg = camera_cfg
        self.view_dependent = view_dependent
        self.cache = cache if cache is not None else EmbeddingCache(model_identity)
        self.texts = {view: self.text_for(view) for view in VIEWS}
        ordered = [self.texts[v] for v in VIEWS] + [self.negative_prompt]
        values = self.cache.get_or_compute(ordered, encode)
        self.cond = {v: values[i].to(device=device, dtype=dtype) for i, v in enumerate(VIEWS)}
        self.uncond = values[-1].to(device=device, dtype=dtype)
        self.cond_table = torch.stack([self.cond[v] for v in VIEWS])  # (len(VIEWS), L, D), indexed on the device

    def text_for(self, view: str) -> str:
        return view_prompt(self.prompt, view) if self.view_dependent else self.prompt

    def views(self, cameras: Cameras) -> list[str]:
        return view_names(cameras, self.camera_cfg)

    def for_cameras(self, cameras: Cameras) -> tuple[Tensor, Tensor]:
        """(cond, uncond), each (B, L, D): each camera's view prompt and the negative prompt. Picked by an
        index on the device, so that a GPU step does not wait here for the render to finish."""
        index = view_indices(cameras, self.camera_cfg).to(self.cond_table.device)
        cond = self.cond_table.index_select(0, index)
        uncond = self.uncond.expand(len(index), *self.uncond.shape)
        return cond, uncond
