"""CLIP-guided text-to-3D (Dream Fields style): maximise CLIP similarity of augmented renders to the prompt,
with a transmittance regulariser (cfg.loss.transmittance) keeping the volume sparse."""

from __future__ import annotations

from threed.methods.method import Method

METHOD = Method(
    name="clip", summary="CLIP guidance with Dream Fields' transmittance loss",
    preset="clip", cpu_preset="clip-cpu", priors=("clip",), aliases=("dreamfields",))

