"""Shared fixtures: offline hub, a private embedding cache per test, and a tiny Stable Diffusion folder."""

from __future__ import annotations

import os
import signal
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
# Under pytest-xdist (the README's test command runs two workers on a 2-core machine) each worker and the
# processes it starts compute on one thread: two workers with two threads each would contend for the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
# The Ctrl-C tests need SIGINT delivered as in a terminal. A shell without job control starts background
# commands with SIGINT ignored, which every child inherits (and Python then installs no KeyboardInterrupt
# handler): restore the usual disposition here, for this process and the processes it starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow(minutes=0): takes more than ~20 s on a CPU (deselect with -m 'not slow'); "
                            "minutes, where given, its measured time on one thread, which orders the slow tests")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (run: pytest -m cuda tests/test_cuda.py)")
    # pytest-xdist's --dist loadfile hands out files largest-first by their number of tests unless told not to;
    # the order that matters here is pytest_collection_modifyitems' (the longest runs first).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` run first (the order is otherwise kept), so that pytest-xdist's two workers start on
    the long optimisation runs and the short tests fill in around them, instead of the last long file keeping
    one worker busy alone at the end. Tests marked `cuda` skip where no CUDA device is visible (all of CI);
    `pytest -m cuda` on a GPU machine runs them."""
    def order(item: pytest.Item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -float(slow.kwargs.get("minutes", 0)) if slow else 0.0

    items.sort(key=order)  # stable: slow tests first, the longest (slow(minutes=...)) before the others
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_taesd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random AutoencoderTiny folder (TAESD architecture), built once per session."""
    from tiny_models import build_tiny_taesd

    return build_tiny_taesd(tmp_path_factory.mktemp("tiny-taesd") / "taesd")
