"""Files on disk: atomic writes (a crash or Ctrl-C never leaves a half-written file behind) and the folder
where threed keeps what it can reuse between runs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def cache_root() -> Path:
    """`$THREED_CACHE`, default `~/.cache/threed`: prompt embeddings, compiled kernels."""
    root = os.environ.get("THREED_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "threed"


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: Path | str, record: dict) -> None:
    """One JSON object per line; a line is written whole with a single write call."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
