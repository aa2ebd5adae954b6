"""Atomic writes: results appear whole or not at all, and their permissions follow the umask like open()."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from exporters import write_glb, write_image_grid, write_obj, write_ply, write_video
from threed.io import atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_text

CUBE_V = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=np.float32)
CUBE_F = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                   [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


WRITERS = {
    "text": lambda p: atomic_write_text(p / "a.txt", "hello"),
    "bytes": lambda p: atomic_write_bytes(p / "a.bin", b"\x00\x01"),
    "torch.save": lambda p: atomic_torch_save({"x": torch.ones(2)}, p / "a.pt"),
    "atomic_path": lambda p: _through_atomic_path(p / "a.dat"),
    "obj+mtl": lambda p: write_obj(p / "mesh.obj", CUBE_V, CUBE_F),
    "glb": lambda p: write_glb(p / "mesh.glb", CUBE_V, CUBE_F),
    "ply": lambda p: write_ply(p / "mesh.ply", CUBE_V, CUBE_F),
    "png": lambda p: write_image_grid([np.zeros((16, 16, 3), np.uint8)], p / "grid.png", cols=1),
    "mp4": lambda p: write_video([np.zeros((16, 16, 3), np.uint8)] * 2, p / "turntable.mp4", fps=4),
}


def _through_atomic_path(path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a third-party writer that opens the path itself
            f.write(b"data")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("writer", WRITERS, ids=list(WRITERS))
def test_new_files_follow_the_umask(writer, mask, tmp_path, umask):
    """Before: every atomically written file was 0600 whatever the umask (mkstemp's mode)."""
    umask(mask)
    WRITERS[writer](tmp_path)
    files = sorted(tmp_path.iterdir())
    assert files and not [p for p in files if p.name.startswith(".")]  # no temporary file left behind
    for path in files:
        assert mode(path) == 0o666 & ~mask, (path.name, oct(mode(path)))


def test_overwriting_keeps_the_existing_permissions(tmp_path, umask):
    """As open(path, "w") does: a file someone made 0640 (or 0644) stays so when rewritten."""
    umask(0o022)
    path = tmp_path / "a.txt"
    atomic_write_text(path, "one")
    os.chmod(path, 0o640)
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and mode(path) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
