"""Per-step time of a preset, split into render / guidance / backward / optimiser, and peak memory.

    python examples/benchmark_step.py --preset dreamfusion-sd                    # real-size SD-2.1-base, random
    python examples/benchmark_step.py --preset dreamfusion-sd --model DIR_OR_ID  # your own weights
    python examples/benchmark_step.py --preset cpu-tiny --tiny-sd               # tiny random SD (CPU smoke)

Without --model, the guidance is Stable Diffusion 2.1-base's real architecture (configs in
examples/sd21-base-architecture/) with random weights: speed and memory do not depend on weight values,
and no download is needed. Its renders mean nothing. Timings are medians over --steps after --warmup.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_models: the offline CLIP tokenizer and tiny SD


def build_random_sd(arch_dir: Path, out: Path) -> Path:
    """A diffusers folder with SD's real-size architecture and random weights (for speed only)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from tiny_models import build_clip_tokenizer

    load = lambda name: {k: v for k, v in json.loads((arch_dir / name).read_text()).items()  # noqa: E731
                         if not k.startswith("_")}
    torch.manual_seed(0)
    UNet2DConditionModel(**load("unet.json")).save_pretrained(out / "unet")
    AutoencoderKL(**load("vae.json")).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(**load("text.json"))).save_pretrained(out / "text_encoder")
    build_clip_tokenizer().save_pretrained(out / "tokenizer")
    sched = load("scheduler.json")
    DDPMScheduler(**{k: sched[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                            "prediction_type", "steps_offset", "clip_sample")}).save_pretrained(
        out / "scheduler")
    return out


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
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    from threed.config import build_config, resolve_device
    from threed import methods
    from threed.trainer import Trainer, peak_memory_mb

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            if args.tiny_sd:
                from tiny_models import build_tiny_sd

                model = str(build_tiny_sd(Path(tmp) / "sd"))
            else:
                model = str(build_random_sd(Path(args.arch), Path(tmp) / "sd"))
        # The tiny VAE downsamples 2x, not 8x: keep its latents (and the UNet's attention) small.
        tiny = ["guidance.sd.resolution=64"] if args.tiny_sd else []
        cfg = build_config(args.preset, [f"guidance.sd.model={model}", "prompt=a yellow rubber duck",
                                         f"device={device}", *tiny, *args.overrides])
        guidance = methods.get(cfg.method).build_guidance(cfg, device)
        trainer = Trainer(cfg, device, guidance, run_dir=Path(tmp) / "run")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        phases: dict[str, list[float]] = {"render": [], "guidance": [], "backward": [], "optimizer": [], "step": []}
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            trainer.train_step()
            total = time.perf_counter() - start
            if i >= args.warmup:
                for k, v in trainer.timings.items():
                    phases[k].append(v)
                phases["step"].append(total)
        med = {k: statistics.median(v) for k, v in phases.items()}
        result = {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "preset": args.preset, "model": args.model or ("tiny random SD" if args.tiny_sd else "SD-2.1-base architecture, random weights"),
            "field_backend": trainer.field.backend, "renderer_backend": trainer.renderer.backend,
            "render": f"{cfg.render.width}x{cfg.render.height}", "guidance_resolution": cfg.guidance.sd.resolution,
            "half_precision": cfg.guidance.sd.half_precision and device == "cuda",
            "steps_timed": args.steps, "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
            "it_per_s": round(1.0 / med["step"], 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "peak_memory_kind": "CUDA max allocated" if device == "cuda" else "process max RSS",
        }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
