"""Hash-grid encoding speed per backend: forward and forward+backward medians (PyTorch, Triton, tiny-cuda-nn).

    python examples/benchmark_hashgrid.py                    # 64*64*128 points, 16 levels x 2 features, 2^19
    python examples/benchmark_hashgrid.py --json hashgrid.json          # stops starting rows after --budget 55 s
    python examples/benchmark_hashgrid.py --triton-blocks 64,128,256,512 --triton-warps 2,4,8   # tune Triton

The defaults are one dreamfusion-sd render's samples through its grid (configs/dreamfusion-sd.yaml). Every
backend gets the same table and points; each row also gives its largest difference from the PyTorch
backend's output. A backend that is not available here is listed as such, not an error. "first call" is
the first forward's time, which includes Triton's compilation (cached on disk for later runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build(backend: str, cfg, device: torch.device, block: int | None = None, warps: int | None = None):
    """(module, None) or (None, reason it is unavailable)."""
    from threed.fields.hashgrid import TorchHashGrid, tcnn_available, triton_available

    try:
        if backend == "torch":
            return TorchHashGrid(cfg).to(device), None
        if backend == "triton":
            if not triton_available(device):
                return None, "needs CUDA (or TRITON_INTERPRET=1) and triton"
            from threed.fields.hashgrid_triton import BLOCK, NUM_WARPS, TritonHashGrid

            return TritonHashGrid(cfg, block=block or BLOCK, num_warps=warps or NUM_WARPS).to(device), None
        if backend == "tcnn":
            if not tcnn_available(device):
                return None, "needs CUDA and tinycudann"
            from threed.fields.hashgrid import TcnnHashGrid

            return TcnnHashGrid(cfg).to(device), None
    except Exception as e:  # a broken install must not stop the other backends' rows
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None, f"unknown backend {backend}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=64 * 64 * 128)
    p.add_argument("--levels", type=int, default=16)
    p.add_argument("--features", type=int, default=2)
    p.add_argument("--log2-hashmap-size", type=int, default=19)
    p.add_argument("--base-resolution", type=int, default=16)
    p.add_argument("--max-resolution", type=int, default=2048)
    p.add_argument("--backends", default="torch,triton,tcnn")
    p.add_argument("--triton-blocks", default="", help="comma-separated block sizes to sweep (default: the module's)")
    p.add_argument("--triton-warps", default="", help="comma-separated warp counts to sweep (default: the module's)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=55.0, help="start no row after this many seconds (0: no limit)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    from threed.config import FieldConfig

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = FieldConfig(n_levels=args.levels, n_features_per_level=args.features,
                      log2_hashmap_size=args.log2_hashmap_size, base_resolution=args.base_resolution,
                      max_resolution=args.max_resolution)
    torch.manual_seed(0)
    x = torch.rand(args.points, 3, device=device)
    grad = torch.randn(args.points, args.levels * args.features, device=device)
    table = None
    reference = None

    variants: list[tuple[str, int | None, int | None]] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "triton" and (args.triton_blocks or args.triton_warps):
            blocks = [int(b) for b in args.triton_blocks.split(",") if b] or [None]
            warps = [int(w) for w in args.triton_warps.split(",") if w] or [None]
            variants += [("triton", b, w) for b in blocks for w in warps]
        else:
            variants.append((backend, None, None))
    if "torch" not in [v[0] for v in variants]:
        variants.insert(0, ("torch", None, None))  # the reference for the agreement column

    rows = []
    began = time.perf_counter()
    for backend, block, warps in variants:
        name = backend + (f" (block {block or 'default'}, warps {warps or 'default'})" if block or warps else "")
        row: dict = {"backend": name}
        rows.append(row)
        if args.budget > 0 and time.perf_counter() - began > args.budget:
            row["status"] = f"not run: past --budget {args.budget:g} s"
            continue
        enc, reason = build(backend, cfg, device, block, warps)
        if enc is None:
            row["status"] = f"unavailable: {reason}"
            print(f"{name}: {row['status']}", flush=True)
            continue
        try:
            with torch.no_grad():
                if table is None:
                    table = torch.empty_like(enc.params, dtype=torch.float32).uniform_(-1.0, 1.0)
                enc.params.copy_(table.to(enc.params.dtype))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                out = enc(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["first_call_s"] = round(time.perf_counter() - start, 3)
                if backend == "torch" and reference is None:
                    reference = out.float()
                if reference is not None:
                    row["max_abs_diff_vs_torch"] = float((out.float() - reference).abs().max())
                del out

            def forward():
                with torch.no_grad():
                    enc(x)

            def forward_backward():
                enc.params.grad = None
                enc(x).backward(grad)

            row["forward_ms"] = round(timed(forward, device, args.warmup, args.repeats), 3)
            row["forward_backward_ms"] = round(timed(forward_backward, device, args.warmup, args.repeats), 3)
            row["status"] = "ok"
        except Exception as e:  # e.g. out of memory: report it and go on with the next backend
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "points": args.points, "levels": args.levels, "features": args.features,
        "log2_hashmap_size": args.log2_hashmap_size, "base_resolution": args.base_resolution,
        "max_resolution": args.max_resolution, "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget,
        "results": rows,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"\n{result['device']}, {args.points} points, {args.levels} levels x {args.features}, "
          f"2^{args.log2_hashmap_size}; medians of {args.repeats} (ms)")
    print(f"{'backend':<40} {'forward':>10} {'fwd+bwd':>10} {'first call s':>13} {'max |diff|':>11}  status")
    for r in rows:
        fmt = lambda k, spec: format(r[k], spec) if k in r else "-"  # noqa: E731
        print(f"{r['backend']:<40} {fmt('forward_ms', '10.3f'):>10} {fmt('forward_backward_ms', '10.3f'):>10} "
              f"{fmt('first_call_s', '13.3f'):>13} {fmt('max_abs_diff_vs_torch', '11.2e'):>11}  {r['status'].split(';')[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
