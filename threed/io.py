"""Files on disk: atomic writes (a crash or Ctrl-C never leaves a half-written file behind) and the folder
where threed keeps what it can reuse between runs.

The one atomic-write implementation lives in `exporters.atomic` (exporters import nothing from threed, so
the shared helper sits on their side); results follow the umask like a plain open().
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exporters.atomic import atomic_path, atomic_write_bytes, atomic_write_text

def cache_root() -> Path:
    """`$THREED_CACHE`, default `~/.cache/threed`: prompt embeddings, compiled kernels."""
    root = os.environ.get("THREED_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "threed"


__all__ = ["append_jsonl", "atomic_path", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "cache_root"]


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: Path | str, record: dict) -> None:
    """One JSON object per line; a line is written whole with a single write call. After a line cut short
    by a crash, the record starts a line of its own (it would otherwise be lost with the broken one)."""
    with open(path, "a+b") as f:
        cut = f.tell() > 0 and f.seek(-1, 2) >= 0 and f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())
        f.flush()
