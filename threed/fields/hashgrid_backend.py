"""The hash-grid backend for a device: tiny-cuda-nn, Triton or PyTorch (threed/fields/hashgrid.py).

The choice sits above both backends' modules: hashgrid_triton.py builds on hashgrid.py's TorchHashGrid,
and hashgrid.py never imports hashgrid_triton.py back, so the dependency runs one way.
"""

from __future__ import annotations

import torch
from torch import nn

from threed.config import FieldConfig
from threed.errors import UserError
from threed.fields.hashgrid import TcnnHashGrid, TorchHashGrid, tcnn_available, triton_available


def make_hashgrid(cfg: FieldConfig, device: torch.device | str) -> tuple[nn.Module, str]:
    """Pick the backend. Returns (module, name).

    auto: tcnn on CUDA when importable, else triton on CUDA when importable, else PyTorch. An explicit
    choice that cannot run is a UserError; triton on a CPU device only runs under TRITON_INTERPRET=1.
    """
    want, device = cfg.backend, torch.device(device)
    if want == "tcnn" and not tcnn_available(device):
        raise UserError("field.backend=tcnn needs CUDA and tinycudann (pip install "
                        "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch); "
                        "use field.backend=triton or field.backend=torch")
    if want == "triton" and not triton_available(device):
        if device.type != "cuda":
            raise UserError("field.backend=triton needs a CUDA device (on a CPU only with TRITON_INTERPRET=1, "
                            "slowly, for tests); use field.backend=torch")
        raise UserError("field.backend=triton needs the triton package (pip install triton); use field.backend=torch")
    if want == "tcnn" or (want == "auto" and tcnn_available(device)):
        return TcnnHashGrid(cfg).to(device), "tcnn"
    if want == "triton" or (want == "auto" and device.type == "cuda" and triton_available(device)):
        from threed.fields.hashgrid_triton import TritonHashGrid  # accelerator: imported only when chosen

        return TritonHashGrid(cfg).to(device), "triton"
    return TorchHashGrid(cfg).to(device), "torch"
