"""Time of textured export (decimate + unwrap + bake + write) and of xatlas alone against the face count.

The input is a bumpy closed surface from marching cubes (several bump frequencies, so charts have to
bend and fold, unlike on a sphere), decimated to --faces. Its colour comes from a hash-grid NeRF
field with threed's default field config and random weights (--albedo field: the per-point cost of a
real field's albedo; its colours mean nothing) or from an analytic function (--albedo analytic).
Each time is the median over --runs runs.

    python examples/benchmark_texture.py                        # 100k-face input, 1024^2, both formats
    python examples/benchmark_texture.py --faces 100000 --runs 3 --json texture-timing.json
    python examples/benchmark_texture.py --device cuda          # bake on a GPU (unwrap stays on the CPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bumpy_surface(faces: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A closed, bumpy blob from marching cubes of a noisy SDF, decimated to `faces` faces."""
    import mcubes

    from threed.mesh import decimate

    rng = np.random.default_rng(seed)
    resolution = int(np.ceil(np.sqrt(faces / 1.2))) + 16  # marching cubes gives ~1.6 R^2 faces here
    axis = np.linspace(-1.0, 1.0, resolution)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    bumps = sum(amplitude * np.sin(frequency * (x * d[0] + y * d[1] + z * d[2]) + phase)
                for amplitude, frequency, d, phase in
                ((0.06, 6.0, rng.normal(size=3), 0.3), (0.04, 11.0, rng.normal(size=3), 1.1),
                 (0.02, 23.0, rng.normal(size=3), 2.0), (0.01, 41.0, rng.normal(size=3), 0.7)))
    sdf = r - (0.6 + bumps)
    vertices, tris = mcubes.marching_cubes(-sdf, 0.0)
    vertices = (vertices * (2.0 / (resolution - 1)) - 1.0).astype(np.float32)
    tris = tris.astype(np.int64)
    if len(tris) < faces:
        raise RuntimeError(f"marching cubes gave {len(tris)} faces, fewer than {faces}")
    return decimate(vertices, tris, faces)


def albedo_function(kind: str, device: str):
    import torch

    if kind == "analytic":
        return lambda p: (torch.sin(4.0 * p) + 1.0) / 2.0
    from threed.config import FieldConfig
    from threed.fields.nerf import NeRFField

    torch.manual_seed(0)
    field = NeRFField(FieldConfig(), bound=1.0, device=device).eval()
    return field.albedo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faces", type=int, default=100000, help="input mesh size")
    p.add_argument("--max-faces", type=int, default=50000, help="decimation target before unwrapping")
    p.add_argument("--texture-size", type=int, default=1024)
    p.add_argument("--albedo", choices=["field", "analytic"], default="field")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--xatlas-faces", default="5000,10000,20000,50000",
                   help="face counts for the xatlas-alone table ('' to skip)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import torch

    from threed.mesh import decimate
    from threed.texture import export_textured, unwrap

    torch.set_grad_enabled(False)
    vertices, faces = bumpy_surface(args.faces)
    albedo = albedo_function(args.albedo, args.device)
    print(f"input: {len(faces)} faces, {len(vertices)} vertices; texture {args.texture_size}^2, "
          f"max_faces {args.max_faces}, albedo {args.albedo} on {args.device}")

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            timings: dict[str, float] = {}
            start = time.perf_counter()
            paths = export_textured(vertices, faces, albedo, Path(tmp) / str(i), texture_size=args.texture_size,
                                    max_faces=args.max_faces, device=args.device, progress=False,
                                    timings=timings)
            timings["total"] = time.perf_counter() - start
            runs.append(timings)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), flush=True)
        sizes = {p.name: p.stat().st_size for p in paths}
    export = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("median: " + ", ".join(f"{k} {v:.2f} s" for k, v in export.items()))

    xatlas_rows = []
    counts = [int(c) for c in args.xatlas_faces.split(",") if c.strip()]
    for count in counts:
        v, f = decimate(vertices, faces, count)
        row = {"faces": int(len(f))}
        for label, area in (("default_s", 0.0), ("bounded_s", 0.02)):
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                unwrap(v, f, resolution=args.texture_size, max_chart_area=area)
                times.append(time.perf_counter() - start)
            row[label] = statistics.median(times)
        xatlas_rows.append(row)
        print(f"xatlas {row['faces']:>7} faces: defaults {row['default_s']:.2f} s, "
              f"max_chart_area 0.02 {row['bounded_s']:.2f} s", flush=True)

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                   f"{torch.get_num_threads()}",
        "device": args.device,
        "input_faces": int(len(faces)), "max_faces": args.max_faces, "texture_size": args.texture_size,
        "albedo": args.albedo, "runs": args.runs,
        "export_median_s": export, "export_runs_s": runs, "file_bytes": sizes,
        "xatlas": xatlas_rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
