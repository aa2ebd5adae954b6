"""Whether an optional accelerator (tiny-cuda-nn, nerfacc, nvdiffrast, Triton) can serve a device.

Accelerators are imported only when a run asks whether it can use one, never when threed is imported, and
only for a CUDA device: nerfacc's CUDA functions on CPU tensors try to JIT-compile an extension.
"""

from __future__ import annotations

import importlib

import torch


def importable_for(device: torch.device | str, module: str, cpu: bool = False) -> bool:
    """`module` imports cleanly and `device` is CUDA (or any device with `cpu`). A broken install (a
    missing shared library, a wrong CUDA build) counts as absent."""
    if torch.device(device).type != "cuda" and not cpu:
        return False
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError):
        return False
    return True
