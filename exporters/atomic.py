"""Atomic file writes for exporters: a crash or Ctrl-C never leaves a half-written file behind.

Exporters take plain arrays and know nothing of runs, so they carry their own copy of this small
pattern (a temporary file beside the target, then `os.replace`). The temporary file is created with
mode 0666 through `os.open`, so the result follows the user's umask like any ordinary write (a
`tempfile.mkstemp` file would stay 0600 and unreadable to other users and web servers).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
