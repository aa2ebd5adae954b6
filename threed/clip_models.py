"""Loading open_clip models without surprises: offline-safe, strict, and loud about random weights.

open_clip resolves a pretrained tag by downloading from the Hugging Face hub, retrying for a long
time when there is no network. We resolve the weights ourselves first: a tag is looked up in the HF
cache (and open_clip's URL cache), a path must exist, and `none` builds a randomly initialised model
(only useful for tests and timing, so it says so on stderr). When the weights are not on disk and the
hub cannot be reached, the user gets a one-line `UserError` within seconds.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from threed.errors import UserError, first_line
from threed.guidance.hub import hf_cache_dir, hub_offline, hub_reachable

MeanStd = tuple[Tensor, Tensor]  # each (3,), on the model's device
Tokenizer = Callable[[Sequence[str]], Tensor]

RANDOM_INIT = "none"
_RANDOM_SEED = 0  # random-init CLIPs are reproducible: same name -> same weights


def _open_clip():
    import open_clip

    return open_clip


def register_arch_file(name: str) -> str:
    """A `.json` open_clip architecture file is registered and its stem becomes the model name."""
    path = Path(name).expanduser()
    if path.suffix != ".json":
        return name
    if not path.is_file():
        raise UserError(f"CLIP architecture file {path} not found; pass an existing .json or an open_clip name like ViT-B-32")
    _open_clip().add_model_config(path)
    return path.stem


def check_arch(name: str) -> str:
    """Return the open_clip architecture name or raise a UserError listing close ones."""
    name = register_arch_file(name)
    models = _open_clip().list_models()
    if name in models:
        return name
    alt = name.replace("/", "-")
    if alt in models:
        return alt
    close = difflib.get_close_matches(alt, models, n=5, cutoff=0.4) or models[:5]
    raise UserError(f"unknown CLIP architecture '{name}'; close open_clip names: {', '.join(close)}")


def canonical_id(name: str, pretrained: str) -> tuple[str, str]:
    """A key that is equal for two (arch, weights) pairs that are the same network.

    `-quickgelu` variants share weights with their base arch; paths compare as absolute paths.
    """
    arch = Path(name).stem if name.endswith(".json") else name.replace("/", "-")
    arch = arch.removesuffix("-quickgelu")
    p = pretrained.strip()
    if p.lower() == RANDOM_INIT:
        p = RANDOM_INIT
    elif os.sep in p or Path(p).suffix:
        p = str(Path(p).expanduser().resolve())
    else:
        p = p.lower()
    return arch, p


def _hf_repo_and_files(tag_cfg: dict) -> tuple[str, list[str]]:
    """open_clip's `hf_hub` entry is 'org/repo/filename' or 'org/repo/' (default file names)."""
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    if filename:
        files = [filename]
        if filename.endswith((".bin", ".pth")):
            files.insert(0, filename[:-4] + ".safetensors")
    else:
        files = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return repo, files


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """The weights of a tag if they are already on disk (HF cache or open_clip's URL cache)."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, files = _hf_repo_and_files(tag_cfg)
        for filename in files:
            hit = try_to_load_from_cache(repo_id=repo, filename=filename, cache_dir=hf_cache_dir())
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if tag_cfg.get("url"):
        local = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if local.is_file():
            return str(local)
    return None


def _download_hint(name: str, tag: str, tag_cfg: dict) -> str:
    if tag_cfg.get("hf_hub"):
        repo, _ = _hf_repo_and_files(tag_cfg)
        how = f"`hf download {repo}`"
    else:
        how = f"downloading {tag_cfg.get('url', '?')} into ~/.cache/clip/"
    return (f"CLIP {name} weights '{tag}' are not cached and the Hugging Face hub is unreachable (offline); "
            f"get them with {how} on a connected machine, or pass --clip-pretrained /path/to/checkpoint (or none for random weights)")


def resolve_pretrained(name: str, pretrained: str) -> tuple[str | None, dict]:
    """(checkpoint file or None for random init, the tag's open_clip config or {}); fast, no hub retries.

    Downloads a tag only when the hub answers a quick connect.
    """
    oc = _open_clip()
    name = check_arch(name)
    pretrained = (pretrained or "").strip()
    if pretrained == "" or pretrained.lower() == RANDOM_INIT:
        return None, {}
    tag_cfg = oc.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        cached = _cached_tag_file(tag_cfg)
        if cached:
            return cached, tag_cfg
        if hub_offline() or not hub_reachable():
            raise UserError(_download_hint(name, pretrained, tag_cfg))
        try:
            cache = str(hf_cache_dir()) if tag_cfg.get("hf_hub") else None
            return oc.download_pretrained(tag_cfg, cache_dir=cache), tag_cfg
        except Exception as e:  # network errors of every kind end the same way for the user
            raise UserError(f"could not download CLIP {name} weights '{pretrained}' ({first_line(e)}); "
                            f"pass --clip-pretrained /path/to/checkpoint instead") from None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    looks_like_path = os.sep in pretrained or path.suffix != ""
    if looks_like_path:
        raise UserError(f"CLIP checkpoint {path} not found; pass an existing file, an open_clip tag, or none")
    tags = oc.list_pretrained_tags_by_model(name)
    shown = ", ".join(tags[:8]) if tags else "(none known)"
    raise UserError(f"unknown pretrained tag '{pretrained}' for CLIP {name}; known tags: {shown}; "
                    f"or pass a checkpoint file or none")


def native_image_size(name: str) -> int:
    cfg = _open_clip().get_model_config(check_arch(name))
    size = cfg["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def load_clip(name: str, pretrained: str, device: str | torch.device = "cpu",
              image_size: int | None = None) -> tuple[nn.Module, MeanStd, Tokenizer]:
    """Build an open_clip model in eval mode with frozen weights.

    Returns (model, (mean, std) for normalising [0, 1] images, tokenizer). `image_size` other than the
    architecture's native size rebuilds the vision tower at that size (open_clip interpolates the
    position embeddings of loaded weights).
    """
    oc = _open_clip()
    arch = check_arch(name)
    checkpoint, tag_cfg = resolve_pretrained(arch, pretrained)
    kwargs: dict = {}
    if tag_cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True  # the tag was trained with QuickGELU; match it
    if tag_cfg.get("mean") and tag_cfg.get("std"):
        kwargs["force_preprocess_cfg"] = {"mean": tag_cfg["mean"], "std": tag_cfg["std"]}
    if image_size is not None and image_size != native_image_size(arch):
        kwargs["force_image_size"] = int(image_size)
    if checkpoint is None:
        print(f"WARNING: CLIP {arch} is RANDOMLY INITIALISED (--clip-pretrained none): only for tests and timing",
              file=sys.stderr, flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model = oc.create_model(arch, pretrained=None, device="cpu", **kwargs)
    else:
        try:
            model = oc.create_model(arch, pretrained=checkpoint, device="cpu", **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise UserError(f"cannot load CLIP {arch} weights from {checkpoint}: {first_line(e)[:200]}; "
                            f"check that the checkpoint matches the architecture") from None
    model = model.to(device).eval().requires_grad_(False)
    pp = model.visual.preprocess_cfg
    mean = torch.tensor(pp["mean"], dtype=torch.float32, device=device)
    std = torch.tensor(pp["std"], dtype=torch.float32, device=device)
    try:
        tokenizer = oc.get_tokenizer(arch)
    except Exception as e:  # HF tokenizers of some archs need files that may not be cached
        raise UserError(f"cannot load the tokenizer of CLIP {arch} ({first_line(e)[:160]}); "
                        f"use an architecture with the built-in tokenizer, e.g. ViT-B-32") from None
    return model, (mean, std), tokenizer


def input_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def preprocess(images: Tensor, mean_std: MeanStd, size: int) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, size, size) normalised; differentiable."""
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)
    mean, std = mean_std
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def encode_images(model: nn.Module, mean_std: MeanStd, images: Tensor) -> Tensor:
    """Unit image embeddings (B, D) of (B, H, W, 3) images in [0, 1], resized to the model's input."""
    x = preprocess(images, mean_std, input_size(model))
    return F.normalize(model.encode_image(x).float(), dim=-1)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str]) -> Tensor:
    """Unit text embeddings (P, D)."""
    device = next(model.parameters()).device
    tokens = tokenizer(list(texts)).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)
