"""Shared fixtures: offline hub, a private embedding cache per test, and a tiny Stable Diffusion folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach the network: the hub client must answer from the cache or fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Without CUDA, Triton kernels run in Triton's interpreter (on CPU tensors). `triton.jit` reads the variable
# when a kernel -- triton's own library included -- is decorated, so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a CPU (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (tests/test_cuda.py; skipped without one)")


@pytest.fixture(autouse=True)
def _private_threed_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own $THREED_CACHE so embedding caches never leak between tests or into ~/.cache."""
    cache = tmp_path / "threed-cache"
    monkeypatch.setenv("THREED_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion folder (diffusers layout), built once per session."""
    from tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd")
