"""Forward and backward time of the mesh rasterizer (rasterize + interpolate + antialias) per backend.

A torus with about the asked number of faces (so it hides parts of itself and has silhouettes on both of its
sides), seen in perspective from above at an angle, filling about half the image; per-vertex colours are
interpolated and antialiased, and a weighted sum of the image is backpropagated to the vertex positions and
colours. Timings are medians over --iters after --warmup; peak memory is GPU memory allocated on CUDA.

    python examples/benchmark_rasterize.py                                 # 10k and 100k faces at 512², auto
    python examples/benchmark_rasterize.py --backends torch,nvdiffrast --json raster.json
    python examples/benchmark_rasterize.py --device cpu --threads 1 --faces 100000

A backend that is not available on the device is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def torus(faces: int, major: float = 0.6, minor: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices (V, 3) and faces (F, 3) of a torus grid with n x m quads, 2 n m ~ `faces`, n = 2 m."""
    m = max(3, round(math.sqrt(faces / 4)))
    n = 2 * m
    u = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    v = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    ring = major + minor * vv.cos()
    verts = torch.stack([ring * uu.cos(), minor * vv.sin(), ring * uu.sin()], -1).reshape(-1, 3)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij")
    a, b = i * m + j, ((i + 1) % n) * m + j
    c, d = ((i + 1) % n) * m + (j + 1) % m, i * m + (j + 1) % m
    tris = torch.cat([torch.stack([a, b, c], -1).reshape(-1, 3), torch.stack([a, c, d], -1).reshape(-1, 3)])
    return verts.float(), tris


def view_projection(distance: float = 2.2, elevation_deg: float = 35.0, fovy_deg: float = 45.0) -> torch.Tensor:
    """OpenGL-style projection @ view (4, 4) for a camera looking at the origin."""
    e = math.radians(elevation_deg)
    eye = torch.tensor([0.0, distance * math.sin(e), distance * math.cos(e)])
    fwd = -eye / eye.norm()
    side = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0]))
    side = side / side.norm()
    up = torch.linalg.cross(side, fwd)
    view = torch.eye(4)
    view[0, :3], view[1, :3], view[2, :3] = side, up, -fwd
    view[:3, 3] = -view[:3, :3] @ eye
    t, near, far = 1.0 / math.tan(math.radians(fovy_deg) / 2), 0.1, 10.0
    proj = torch.tensor([[t, 0, 0, 0], [0, t, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)], [0, 0, -1, 0]])
    return proj @ view


def measure(backend: str, device: str, faces: int, resolution: int, iters: int, warmup: int) -> dict:
    from threed.errors import UserError
    from threed.render.rasterize import MeshRasterizer, edge_topology, visible_triangles

    try:
        rast_ops = MeshRasterizer(backend, device)
    except UserError as e:
        return {"backend": backend, "faces": faces, "skipped": str(e)}
    verts, tris = torus(faces)
    clip = torch.cat([verts, torch.ones(len(verts), 1)], 1) @ view_projection().T
    clip, tris = clip[None].to(device), tris.to(device)
    colors = (0.5 + 0.5 * verts)[None].to(device)
    topology = edge_topology(tris) if rast_ops.backend == "torch" else None  # fixed mesh: build once
    res = (resolution, resolution)
    weight = torch.rand(1, resolution, resolution, 1, device=device, generator=torch.Generator(device).manual_seed(0))
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fwd, bwd, vis = [], [], []
    for i in range(warmup + iters):
        pos = clip.clone().requires_grad_()
        col = colors.clone().requires_grad_()
        sync()
        t0 = time.perf_counter()
        rast = rast_ops.rasterize(pos, tris, res)
        image = rast_ops.antialias(rast_ops.interpolate(col, rast, tris), rast, pos, tris, topology)
        loss = (image * weight).sum()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        if rast_ops.backend == "torch":
            visible_triangles(clip, tris, res)
            sync()
        t3 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            vis.append(t3 - t2)
    covered = (rast[..., 3] > 0).float().mean().item()
    out = {"backend": rast_ops.backend, "faces": int(tris.shape[0]), "resolution": resolution,
           "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads",
           "forward_ms": round(1000 * statistics.median(fwd), 2),
           "backward_ms": round(1000 * statistics.median(bwd), 2),
           "total_ms": round(1000 * statistics.median(f + b for f, b in zip(fwd, bwd)), 2),
           "iters": iters, "covered_fraction": round(covered, 3)}
    if rast_ops.backend == "torch":
        out["visibility_ms"] = round(1000 * statistics.median(vis), 2)
    if cuda:
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", default="10000,100000", help="comma-separated face counts (about)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--backends", default="auto", help="comma-separated: auto, torch, nvdiffrast")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    from threed.config import resolve_device
    from threed.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    results = []
    for backend in args.backends.split(","):
        for faces in (int(f) for f in args.faces.split(",")):
            r = measure(backend.strip(), device, faces, args.resolution, args.iters, args.warmup)
            results.append(r)
            if "skipped" in r:
                print(f"{backend:10s} {faces:7d} faces  skipped: {r['skipped']}", flush=True)
                continue
            extra = f"  visibility {r['visibility_ms']:8.1f} ms" if "visibility_ms" in r else ""
            mem = f"  peak {r['peak_memory_mb']:8.1f} MB" if "peak_memory_mb" in r else ""
            print(f"{r['backend']:10s} {r['faces']:7d} faces {r['resolution']}²  forward {r['forward_ms']:8.1f} ms  "
                  f"backward {r['backward_ms']:8.1f} ms  total {r['total_ms']:8.1f} ms{extra}{mem}  "
                  f"(median of {r['iters']}, {100 * r['covered_fraction']:.0f}% covered) [{r['device']}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
