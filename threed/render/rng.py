"""Uniform draws on the device that uses them, reproducible from the run's CPU generator.

The run owns one CPU `torch.Generator` (cameras, shading choices, jitter). Drawing a render's stratified
offsets on the CPU and copying them costs milliseconds of host time per step on a GPU (64 x 64 rays x 128
samples = 524k numbers) while the GPU waits; instead one 64-bit seed is drawn from the CPU generator and a
generator on the device draws the numbers. On a CPU device the numbers come from the CPU generator itself,
exactly as they always did.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _draw(sample, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """sample(shape, generator=..., device=...) on `device`: a CPU generator drives the draws on the CPU and seeds a
    generator on the device elsewhere (the one stream either way)."""
    device = torch.device(device)
    if device.type == "cpu":
        return sample(shape, generator=generator)
    if generator is None:
        return sample(shape, device=device)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return sample(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """U[0, 1) draws of `shape` on `device`."""
    return _draw(torch.rand, shape, generator, device)


def gaussian(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """N(0, 1) draws of `shape` on `device`, from the same stream as `uniform`."""
    return _draw(torch.randn, shape, generator, device)
