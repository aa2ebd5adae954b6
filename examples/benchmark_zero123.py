"""Image-to-3D (the zero123 preset) per resolution stage: it/s and peak memory of each of its render sizes.

    python examples/benchmark_zero123.py --device cuda --json zero123.json      # real-size Zero123, random weights
    python examples/benchmark_zero123.py --device cuda --model DIR_OR_ID_OR_CKPT  # your own weights
    python examples/benchmark_zero123.py --device cpu --tiny                      # tiny random Zero123 (CPU smoke)

Without --model, the prior is Zero123's real architecture (threed/guidance/zero123_model.py, ZERO123_LDM_CONFIG:
Stable Diffusion 1.x's UNet with 8 input channels, its VAE, OpenAI ViT-L/14 as the image encoder) with random
weights, built in the diffusers layout: speed and memory do not depend on weight values, and nothing is
downloaded. Its renders mean nothing. Each of the preset's stages (render.progressive: 64² x 12, 128² x 8,
256² x 4, with the reference render at 128², 256², 512²) is timed on its own: --warmup steps, then --steps
steps, one wait for the GPU per step; peak memory is the stage's. The 600-step run's training time is then
estimated from the stages' step counts (200, 100, 300) and their it/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", help="Zero123 hub id, diffusers folder or .ckpt [real-size, random weights]")
    p.add_argument("--tiny", action="store_true", help="tiny random Zero123 and small renders (a CPU smoke run)")
    p.add_argument("--preset", default="zero123")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    from threed.config import build_config
    from threed.guidance.zero123 import Zero123Guidance
    from threed.guidance.zero123_model import ZERO123_LDM_CONFIG
    from threed.random_models import build_zero123, tiny_zero123_ldm_config
    from threed.schedule import render_batch
    from threed.stages import IMAGE_NERF

    work = Path(tempfile.mkdtemp(prefix="threed-zero123-"))
    image = np.zeros((256, 256, 4), dtype=np.uint8)  # an orange disc: something to frame
    yy, xx = np.mgrid[:256, :256]
    image[(yy - 128) ** 2 + (xx - 128) ** 2 < 90 ** 2] = (230, 140, 30, 255)
    Image.fromarray(image, "RGBA").save(work / "input.png")
    model = args.model
    if model is None:
        start = time.perf_counter()
        model = str(build_zero123(work / "zero123", tiny_zero123_ldm_config() if args.tiny else ZERO123_LDM_CONFIG,
                                  device=args.device))
        print(f"built a random Zero123 in {time.perf_counter() - start:.1f} s", flush=True)
    base = [f"image.path={work / 'input.png'}", f"guidance.zero123.model={model}", f"device={args.device}"]
    if args.tiny:
        base += ["guidance.zero123.resolution=32", "field.n_levels=4", "field.max_resolution=64",
                 "render.num_samples=32", "render.progressive=[[0, 16, 2], [2, 24, 2]]",
                 "image.sizes=[[0, 24], [2, 32]]"]
    cfg = build_config(args.preset, base + list(args.overrides))
    guidance = Zero123Guidance(cfg, args.device)
    stages = list(cfg.render.progressive) or [(0, cfg.render.width, cfg.render.batch_size)]
    bounds = [s[0] for s in stages[1:]] + [cfg.steps]
    results = []
    for (start_step, side, batch), end_step in zip(stages, bounds):
        trainer = IMAGE_NERF.trainer(cfg, args.device, guidance, _run_dir(work))
        trainer.step = start_step  # the stage's render size, batch, t range and loss weights
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            trainer.train_step()
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        sync(args.device)
        seconds = (time.perf_counter() - t0) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
        row = {"from_step": start_step, "steps_in_run": end_step - start_step, "render": side,
               "batch": render_batch(cfg.render, start_step), "reference_render": cfg.image.size_at(start_step),
               "it_per_s": round(1.0 / seconds, 3), "step_ms": round(1000 * seconds, 1),
               "peak_memory_mb": None if peak is None else round(peak, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
        del trainer
    estimate = sum(r["steps_in_run"] / r["it_per_s"] for r in results)
    out = {"preset": args.preset, "device": args.device, "gpu": torch.cuda.get_device_name() if
           args.device.startswith("cuda") else platform.processor(), "model": args.model or "random real-size"
           if not args.tiny else "random tiny", "stages": results, "estimated_train_s": round(estimate, 1),
           "peak_memory_mb": max((r["peak_memory_mb"] for r in results if r["peak_memory_mb"] is not None),
                                 default=None)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


def _run_dir(work: Path):
    """A fresh run folder for a stage's trainer (it writes nothing unless asked to checkpoint)."""
    from threed.rundir import RunDir

    return RunDir(Path(tempfile.mkdtemp(prefix="run-", dir=work)))


if __name__ == "__main__":
    main()
