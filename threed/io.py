"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file behind.

The one implementation lives in `exporters.atomic` (exporters import nothing from threed, so the shared
helper sits on their side); results follow the umask like a plain open().
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporters.atomic import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["append_jsonl", "atomic_path", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text"]


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: Path | str, record: dict) -> None:
    """One JSON object per line; a line is written whole with a single write call."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
