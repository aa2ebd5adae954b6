"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file behind.

The data goes to a temporary file beside the target, which then replaces the target in one rename.
The temporary file is created the way `open(path, "w")` creates a file, so the result's permissions
follow the umask (0666 & ~umask: readable by others under the usual 022), and a file that already
exists keeps its permissions. (`tempfile.mkstemp` would make every result 0600.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator


def _create_beside(path: Path) -> Path:
    """A new empty file in `path`'s folder, named `.<name>.<random><suffix>`, created with mode 0666 so
    the umask applies exactly as for a plain open()."""
    suffix = path.suffix or ".tmp"  # writers that pick a format by extension still see the real one
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(path)
    try:
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # overwriting keeps the old permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
