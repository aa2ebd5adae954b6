"""ProlificDreamer (VSD) step cost against an SDS step at the same render size: time split and peak memory.

    python examples/benchmark_vsd.py --json vsd.json                      # CUDA: real-size SD-2.1-base, random
    python examples/benchmark_vsd.py --tiny-sd --device cpu --preset prolificdreamer-cpu   # CPU smoke

Without --model the prior is Stable Diffusion 2.1-base's real architecture (examples/sd21-base-architecture/)
with random weights, as both the pretrained model and the LoRA's base (one shared UNet, the preset's
default); --lora-model DIR loads a separate base (e.g. a v-prediction SD 2.1 folder). Speed and memory do
not depend on weight values; the renders mean nothing.

Each (method, resolution) runs in its own subprocess, so each peak is its own (CUDA max allocated, or the
process's max RSS on a CPU) and a failure (out of memory, a timeout) is recorded without losing the
others. For each: the median step and its split (render / guidance / backward / optimizer; for VSD the
guidance further into encode / pretrained UNet / particle UNet / particle training), after --warmup steps.
The "LoRA branch" is the particle UNet's forward for the update plus its training step; the targets on
one H100 are a peak <= 16 GB at 512x512 and a LoRA branch <= 1.6x the SDS step at the same size.
The field starts as the initial density blob, so the renderer samples more than after empty space is
carved (the preset trains 5000 steps at 64x64 before 512x512).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def phase(args: argparse.Namespace) -> dict:
    """One (method, resolution) measurement in this process."""
    import torch

    from threed import methods
    from threed.config import build_config, resolve_device
    from threed.trainer import Trainer, peak_memory_mb

    method, size = args.phase.split(":")
    size = int(size)
    device = resolve_device(args.device)
    overrides = [f"guidance.sd.model={args.model}", "prompt=a pineapple", f"device={device}",
                 f"render.width={size}", f"render.height={size}", "render.hires_step=-1",
                 *(["guidance.sd.resolution=64"] if args.tiny_sd else []),
                 *([f"guidance.vsd.lora_model={args.lora_model}"] if args.lora_model and method == "vsd" else []),
                 *(["method=dreamfusion"] if method == "sds" else []), *args.overrides]
    cfg = build_config(args.preset, overrides)
    start = time.perf_counter()
    guidance = methods.get(cfg.method).build_guidance(cfg, device)
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, device, guidance, run_dir=Path(tmp))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        split: dict[str, list[float]] = {}
        for i in range(args.warmup + args.steps):
            begin = time.perf_counter()
            trainer.train_step()
            total = time.perf_counter() - begin
            if i < args.warmup:
                continue
            parts = {**trainer.timings, "step": total}
            parts.update({f"guidance.{k}": v for k, v in getattr(guidance, "timings", {}).items()})
            for k, v in parts.items():
                split.setdefault(k, []).append(v)
        med = {k: statistics.median(v) for k, v in split.items()}
        result = {
            "method": method, "resolution": size, "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
            "it_per_s": round(1.0 / med["step"], 3), "peak_memory_mb": round(peak_memory_mb(device), 1),
            "peak_memory_kind": "CUDA max allocated" if device == "cuda" else "process max RSS",
            "load_s": round(load_s, 1), "field_backend": trainer.field.backend,
            "renderer_backend": trainer.renderer.backend, "num_samples": cfg.render.num_samples,
            "half_precision": cfg.guidance.sd.half_precision and device == "cuda",
        }
        if method == "vsd":
            result["shared_unet"] = bool(guidance.shared)
            result["lora_branch_ms"] = round((med["guidance.particle"] + med["guidance.particle_train"]) * 1000, 1)
    return result


def run_phase(args: argparse.Namespace, name: str, model: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--model", model, "--preset", args.preset, "--device",
           args.device, "--steps", str(args.steps), "--warmup", str(args.warmup), "--phase-out", str(out)]
    cmd += ["--tiny-sd"] if args.tiny_sd else []
    cmd += ["--lora-model", args.lora_model] if args.lora_model else []
    cmd += args.overrides
    print(f"benchmark_vsd: {name} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, timeout=args.phase_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"phase": name, "error": f"timed out after {args.phase_timeout} s"}
    if out.exists():
        return json.loads(out.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"phase": name, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def summary(results: list[dict]) -> list[str]:
    lines = ["| method | render | step ms | LoRA branch ms | LoRA / SDS step | peak MB |", "| --- | --- | --- | --- | --- | --- |"]
    sds = {r["resolution"]: r for r in results if r.get("method") == "sds"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['phase']} | | error: {r['error']} | | | |")
            continue
        ratio = ""
        if r["method"] == "vsd" and r["resolution"] in sds:
            ratio = f"{r['lora_branch_ms'] / sds[r['resolution']]['median_ms']['step']:.2f}x"
        lines.append(f"| {r['method']} | {r['resolution']}² | {r['median_ms']['step']} | {r.get('lora_branch_ms', '')} "
                     f"| {ratio} | {r['peak_memory_mb']} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="prolificdreamer")
    p.add_argument("--model", help="SD folder or hub id (default: random real-size SD-2.1-base)")
    p.add_argument("--lora-model", help="a separate LoRA base (default: the pretrained UNet, shared)")
    p.add_argument("--tiny-sd", action="store_true", help="a tiny random SD instead (CPU smoke test)")
    p.add_argument("--arch", default=str(HERE / "sd21-base-architecture"))
    p.add_argument("--resolutions", default="64,512")
    p.add_argument("--methods", default="sds,vsd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--phase-timeout", type=int, default=1800, help="seconds per (method, resolution)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    if args.phase:  # a child: measure one phase, write its JSON
        try:
            result = phase(args)
        except Exception as e:  # out of memory and the like: say so in the results
            traceback.print_exc()
            result = {"phase": args.phase, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        Path(args.phase_out).write_text(json.dumps(result))
        return

    import torch

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    with tempfile.TemporaryDirectory() as tmp:
        from threed.random_models import benchmark_sd

        model = benchmark_sd(args.model, Path(tmp), args.tiny_sd, Path(args.arch), "cuda" if cuda else "cpu")
        results = []
        for size in [int(s) for s in args.resolutions.split(",")]:
            for method in [m.strip() for m in args.methods.split(",")]:
                results.append(run_phase(args, f"{method}:{size}", model, Path(tmp) / f"{method}-{size}.json"))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "preset": args.preset,
        "model": args.model or ("tiny random SD" if args.tiny_sd else "SD-2.1-base architecture, random weights"),
        "lora_model": args.lora_model or "shared with the model", "steps_timed": args.steps, "warmup": args.warmup,
        "overrides": args.overrides, "results": results,
    }
    print(json.dumps(report, indent=1))
    print("\n".join(summary(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
