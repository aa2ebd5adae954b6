"""Per-step time of a preset, split into render / guidance / backward / optimiser, and peak memory.

    python examples/benchmark_step.py --preset dreamfusion-sd                    # real-size SD-2.1-base, random
    python examples/benchmark_step.py --preset dreamfusion-sd --model DIR_OR_ID  # your own weights
    python examples/benchmark_step.py --preset dreamfusion-sd guidance.sd.compile=none guidance.sd.compile_vae=none
    python examples/benchmark_step.py --preset cpu-tiny --tiny-sd               # tiny random SD (CPU smoke)
    python examples/benchmark_step.py --build-models DIR --device cuda          # build the random models once

Without --model, the guidance is Stable Diffusion 2.1-base's real architecture (configs in
examples/sd21-base-architecture/) with random weights: speed and memory do not depend on weight values,
and no download is needed. Its renders mean nothing. With `guidance.sd.vae=tiny` and no
`guidance.sd.tiny_vae_model`, the tiny autoencoder is TAESD's architecture with random weights.

Three timings, all after --warmup steps:
- first_step_s: the first step alone, compiling included (cold or warm compile cache), and compile_s, the
  guidance's own compile time (threed/guidance/compile.py), reported apart from the medians;
- median_ms: the step split into phases, the trainer waiting for the GPU after each phase (--steps steps);
- step_ms / it_per_s: whole steps as a run takes them, one wait for the GPU per step (--steps steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def guidance_compile_info(guidance: object) -> dict:
    """How each guidance network ran: its compile mode, compile time, or why it fell back to eager."""
    from threed.guidance.compile import CompiledFunction

    info = {}
    for attr in ("_encode", "_noise"):
        fn = getattr(guidance, attr, None)
        if isinstance(fn, CompiledFunction):
            info[fn.name] = {"mode": fn.mode, "compile_s": None if fn.seconds is None else round(fn.seconds, 2),
                             "eager_fallback": fn.error}
        elif fn is not None:
            info[attr.strip("_")] = {"mode": "none"}
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_step(trainer, warmup: int, device: str) -> float:
    """Seconds of the first step (it compiles the guidance where it is compiled), then the rest of `warmup`."""
    sync(device)
    start = time.perf_counter()
    trainer.train_step()
    sync(device)
    seconds = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        trainer.train_step()
    sync(device)
    return seconds


def timed_steps(trainer, n: int, device: str) -> list[float]:
    """Seconds of `n` steps as a run takes them (one wait for the device per step)."""
    steps: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        trainer.train_step()
        sync(device)
        steps.append(time.perf_counter() - start)
    return steps


def phased_steps(trainer, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`n` steps with the device synchronised after each phase: seconds per phase (render, guidance,
    backward, optimizer), and per part of the scene's render where the scene times them (`scene.timings`)."""
    phases: dict[str, list[float]] = {k: [] for k in ("render", "guidance", "backward", "optimizer")}
    parts: dict[str, list[float]] = {}
    trainer.phase_timing = True
    for _ in range(n):
        trainer.train_step()
        for k, v in trainer.timings.items():
            phases[k].append(v)
        for k, v in getattr(trainer.scene, "timings", {}).items():
            parts.setdefault(k, []).append(v)
    trainer.phase_timing = False
    return phases, parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dreamfusion-sd")
    p.add_argument("--model", help="SD hub id or folder (default: random real-size SD-2.1-base)")
    p.add_argument("--tiny-sd", action="store_true", help="a tiny random SD instead (CPU smoke test)")
    p.add_argument("--arch", default=str(HERE / "sd21-base-architecture"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--label", default="", help="a name for this configuration in the results")
    p.add_argument("--build-models", metavar="DIR",
                   help="only build the random models (DIR/sd: SD-2.1-base, DIR/taesd: TAESD) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    process_start = time.perf_counter()

    from threed.config import build_config, resolve_device
    from threed import methods
    from threed.random_models import (benchmark_sd, build_random_sd, build_random_taesd, build_tiny_sd,
                                      build_tiny_taesd)
    from threed.trainer import Trainer, peak_memory_mb

    device = resolve_device(args.device)
    if args.build_models:
        start = time.perf_counter()
        out = Path(args.build_models)
        if args.tiny_sd:
            build_tiny_sd(out / "sd")
            build_tiny_taesd(out / "taesd")
        else:
            build_random_sd(Path(args.arch), out / "sd", device=device)
            build_random_taesd(out / "taesd")
        print(json.dumps({"built": str(out), "seconds": round(time.perf_counter() - start, 1)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = benchmark_sd(args.model, Path(tmp), args.tiny_sd, Path(args.arch), device)
        # The tiny VAE downsamples 2x, not 8x: keep its latents (and the UNet's attention) small.
        tiny = ["guidance.sd.resolution=64"] if args.tiny_sd else []
        cfg = build_config(args.preset, [f"guidance.sd.model={model}", "prompt=a yellow rubber duck",
                                         f"device={device}", *tiny, *args.overrides])
        if cfg.guidance.sd.vae == "tiny" and not any(o.startswith("guidance.sd.tiny_vae_model=") for o in args.overrides):
            if args.tiny_sd:
                cfg.guidance.sd.tiny_vae_model = str(build_tiny_taesd(Path(tmp) / "taesd"))
            else:
                cfg.guidance.sd.tiny_vae_model = str(build_random_taesd(Path(tmp) / "taesd"))
        guidance = methods.get(cfg.method).build_guidance(cfg, device)
        trainer = Trainer(cfg, device, guidance, run_dir=Path(tmp) / "run")
        setup_s = time.perf_counter() - process_start
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        first_step_s = first_step(trainer, args.warmup, device)
        phases, _ = phased_steps(trainer, args.steps)
        steps = timed_steps(trainer, args.steps, device)

        med = {k: statistics.median(v) for k, v in phases.items()}
        step = statistics.median(steps)
        result = {
            "label": args.label,
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "preset": args.preset, "overrides": args.overrides,
            "model": args.model or ("tiny random SD" if args.tiny_sd else "SD-2.1-base architecture, random weights"),
            "field_backend": trainer.field.backend, "renderer_backend": trainer.renderer.backend,
            "render": f"{cfg.render.width}x{cfg.render.height}", "num_samples": cfg.render.num_samples,
            "guidance_resolution": cfg.guidance.sd.resolution, "vae": cfg.guidance.sd.vae,
            "half_precision": cfg.guidance.sd.half_precision and device == "cuda",
            "guidance_compile": guidance_compile_info(guidance),
            "compile_s": None if getattr(guidance, "compile_time_s", None) is None else round(guidance.compile_time_s, 2),
            "setup_s": round(setup_s, 2), "first_step_s": round(first_step_s, 2),
            "steps_timed": args.steps, "warmup": args.warmup,
            "median_ms": {k: round(v * 1000, 2) for k, v in med.items()},
            "phase_sum_ms": round(sum(med.values()) * 1000, 2),
            "step_ms": round(step * 1000, 2), "step_ms_max": round(max(steps) * 1000, 2),
            "it_per_s": round(1.0 / step, 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "peak_memory_kind": "CUDA max allocated" if device == "cuda" else "process max RSS",
        }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
