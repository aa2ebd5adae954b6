"""Render cost against image size and samples per ray, per field (hash-grid) and renderer backend.

    python examples/benchmark_render.py                                  # about a minute (--budget 55)
    python examples/benchmark_render.py --budget 0 --json render.json    # every row, however long
    python examples/benchmark_render.py --fields triton --renderers torch    # the no-build CUDA path only

Each row times one training render of the preset's field (configs/dreamfusion-sd.yaml unless --preset):
forward (rays -> image, with normals when the preset's orientation loss needs them) and backward of a
loss on the image, medians over --repeats after --warmup, with peak GPU memory. The field is the preset's
freshly initialised one (its density blob), with the occupancy grid filled from it, as at the start of a
run. Rows run in order of interest: every size and sample count of the first field/renderer pair (by
default Triton grid + PyTorch renderer, the path that needs no build), then the preset's 64² x 128 for
the other pairs, then their other sizes; no row starts after --budget seconds. A backend that is not
available is listed as such; a row that runs out of memory or fails is reported and the next one runs.
"first call" includes Triton's compilation and nerfacc's JIT build.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dreamfusion-sd")
    p.add_argument("--sizes", default="64,128,256,512")
    p.add_argument("--samples", default="64,128,256")
    p.add_argument("--fields", default="triton,torch,tcnn", help="field.backend values to compare, first first")
    p.add_argument("--renderers", default="torch,nerfacc", help="render.backend values to compare")
    p.add_argument("--shading", default="lambertian", choices=["albedo", "lambertian", "textureless"])
    p.add_argument("--normals", choices=["preset", "on", "off"], default="preset",
                   help="compute normals for the orientation loss (preset: when its loss.orient is ever > 0)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=8.0, help="stop repeating a row after this long")
    p.add_argument("--budget", type=float, default=55.0, help="start no row after this many seconds (0: no limit)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. render.chunk_rays=65536")
    args = p.parse_args()

    from threed.config import build_config, resolve_device
    from threed.errors import UserError
    from threed.fields.nerf import NeRFField
    from threed.render.background import Background
    from threed.render.volume import VolumeRenderer
    from threed.cameras import sample_cameras

    device = torch.device(resolve_device(args.device))
    sizes = [int(v) for v in args.sizes.split(",") if v]
    samples = [int(v) for v in args.samples.split(",") if v]
    pairs = [(f.strip(), r.strip()) for f in args.fields.split(",") if f.strip()
             for r in args.renderers.split(",") if r.strip()]
    # the first pair's whole sweep, then the preset's own size for the others, then the rest
    preset_cfg = build_config(args.preset, [f"device={device.type}", *args.overrides])
    home = (preset_cfg.render.width, preset_cfg.render.num_samples)
    plan = [(pairs[0], size, n) for size in sizes for n in samples] if pairs else []
    plan += [(pair, *home) for pair in pairs[1:]]
    plan += [(pair, size, n) for pair in pairs[1:] for size in sizes for n in samples if (size, n) != home]
    began = time.perf_counter()
    unavailable: dict[tuple[str, str], str] = {}
    rows: list[dict] = []
    for (field_backend, render_backend), size, n_samples in plan:
        row = {"field": field_backend, "renderer": render_backend, "size": size, "samples": n_samples}
        rows.append(row)
        if (field_backend, render_backend) in unavailable:
            row["status"] = unavailable[(field_backend, render_backend)]
            continue
        if args.budget > 0 and time.perf_counter() - began > args.budget:
            row["status"] = f"not run: past --budget {args.budget:g} s"
            continue
        try:
            cfg = build_config(args.preset, [f"device={device.type}", f"field.backend={field_backend}",
                                             f"render.backend={render_backend}", f"render.width={size}",
                                             f"render.height={size}", f"render.num_samples={n_samples}",
                                             *args.overrides])
            torch.manual_seed(0)
            field = NeRFField(cfg.field, cfg.render.bound, device).train()
            renderer = VolumeRenderer(cfg.render, device)
            background = Background(cfg.render).to(device).train()
        except UserError as e:  # this backend is not available here: skip its rows
            unavailable[(field_backend, render_backend)] = row["status"] = f"unavailable: {e}"
            print(f"{field_backend}/{render_backend}: {row['status']}", flush=True)
            continue
        except Exception as e:
            row["status"] = f"failed: {first_line(e)}"
            continue
        orient_weight = cfg.loss.orient(0)
        need_normals = cfg.loss.orient.bounds()[1] > 0 if args.normals == "preset" else args.normals == "on"
        row.update(field_backend_chosen=field.backend, renderer_backend_chosen=renderer.backend, normals=need_normals)
        generator = torch.Generator().manual_seed(0)
        try:
            start = time.perf_counter()
            renderer.rebuild_occupancy(field)
            sync(device)
            row["occupancy_fill_s"] = round(time.perf_counter() - start, 3)
            fwd, bwd = [], []
            row_began = time.perf_counter()
            for i in range(args.warmup + args.repeats):
                cams = sample_cameras(cfg.camera, cfg.render.batch_size, size, size, generator, cfg.render).to(device)
                field.zero_grad(set_to_none=True)
                sync(device)
                t0 = time.perf_counter()
                out = renderer(field, background, cams, args.shading, need_normals=need_normals, generator=generator)
                sync(device)
                t1 = time.perf_counter()
                (out.rgb.mean() + orient_weight * out.orient + out.opacity.mean()).backward()
                sync(device)
                t2 = time.perf_counter()
                del out
                if i == 0:
                    row["first_call_s"] = round(t2 - t0, 3)
                if i >= args.warmup:
                    fwd.append((t1 - t0) * 1000)
                    bwd.append((t2 - t1) * 1000)
                if time.perf_counter() - row_began > args.max_seconds and (fwd or i + 1 >= args.warmup):
                    break
            if fwd:
                row.update(forward_ms=round(statistics.median(fwd), 2), backward_ms=round(statistics.median(bwd), 2),
                           total_ms=round(statistics.median([a + b for a, b in zip(fwd, bwd)]), 2), timed=len(fwd))
            row["status"] = "ok" if fwd else "warm-up only (past --max-seconds)"
            if device.type == "cuda":
                row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "out of memory"
        except Exception as e:
            row["status"] = f"failed: {first_line(e)}"
        print(json.dumps(row), flush=True)
        del field, renderer, background
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "preset": args.preset, "shading": args.shading, "overrides": args.overrides,
        "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget, "results": rows,
    }
    print(f"\n{result['device']}, preset {args.preset}, shading {args.shading}; medians (ms)")
    print(f"{'field':<8} {'renderer':<9} {'size':>5} {'samples':>7} {'forward':>9} {'backward':>9} {'total':>9} "
          f"{'peak MB':>9} {'first s':>8}  status")
    for r in rows:
        fmt = lambda k, spec: format(r[k], spec) if k in r else "-"  # noqa: E731
        print(f"{r['field']:<8} {r['renderer']:<9} {r['size']:>5} {r['samples']:>7} {fmt('forward_ms', '9.2f'):>9} "
              f"{fmt('backward_ms', '9.2f'):>9} {fmt('total_ms', '9.2f'):>9} {fmt('peak_memory_mb', '9.1f'):>9} "
              f"{fmt('first_call_s', '8.2f'):>8}  {r['status'].split(';')[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
