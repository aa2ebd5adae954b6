"""Per-step time and peak memory of CLIP guidance (augment + image tower forward + backward to the render).

Real-size architectures with random weights (no download needed: the cost does not depend on the
weights). Each (architecture, render size) runs in its own process so peak memory is its own:
GPU memory allocated on CUDA, else the process's peak resident set size.

    python examples/benchmark_clip.py                          # ViT-B-32 and ViT-L-14, 128 and 224 px renders
    python examples/benchmark_clip.py --archs ViT-B-32 --augs 8 --iters 20 --json clip-timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(arch: str, size: int, augs: int, iters: int, warmup: int, device: str) -> dict:
    import resource

    import torch

    from threed.cameras import orbit_cameras
    from threed.config import CameraConfig, ClipConfig, Config, GuidanceConfig, resolve_device
    from threed.guidance.clip import ClipGuidance

    device = resolve_device(device)
    cfg = GuidanceConfig(type="clip", view_dependent_prompting=False,
                         clip=ClipConfig(models=(arch,), pretrained=("none",), resolution=224, num_augs=augs))
    guidance = ClipGuidance(Config(guidance=cfg, prompt="a DSLR photo of a hamburger"), device)
    cams = orbit_cameras(CameraConfig(), 1, size, size).to(device)
    rgb = torch.rand(1, size, size, 3, device=device, requires_grad=True)
    opacity = torch.rand(1, size, size, 1, device=device, requires_grad=True)
    background = torch.ones(1, size, size, 3, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        weights_mb = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        weights_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        out = guidance(rgb, cams, i, "albedo", background, opacity=opacity)
        out["loss"].backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        rgb.grad = opacity.grad = None
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        name = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        name = f"CPU, {torch.get_num_threads()} threads"
    return {"arch": arch, "render": size, "clip_input": 224, "augs": augs, "device": name,
            "median_step_s": round(statistics.median(times), 4), "min_step_s": round(min(times), 4),
            "iters": iters, "peak_memory_mb": round(peak, 1),
            "memory": "GPU allocated" if cuda else "process peak RSS",
            "before_steps_mb": round(weights_mb, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    p.add_argument("--sizes", default="128,224", help="render sizes (the CLIP input stays 224)")
    p.add_argument("--augs", type=int, default=1, help="augmented crops per render (guidance.clip.num_augs)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--one", nargs=2, metavar=("ARCH", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        result = measure(args.one[0], int(args.one[1]), args.augs, args.iters, args.warmup, args.device)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for arch in args.archs.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--one", arch, str(size), "--augs", str(args.augs), "--iters",
                   str(args.iters), "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"measuring {arch} at {size} px failed")
            results.append(json.loads(line[len("RESULT "):]))
            r = results[-1]
            print(f"{arch:10s} render {size:4d}px  augs {r['augs']}  step {r['median_step_s'] * 1000:9.1f} ms (median of "
                  f"{r['iters']})  peak {r['peak_memory_mb']:8.1f} MB ({r['memory']})  [{r['device']}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
