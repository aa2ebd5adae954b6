"""Speed and peak memory of Magic3D's fine (mesh) stage: one training step at the preset's 512² render.

    python examples/benchmark_fine.py                                   # real-size SD-2.1-base, random weights
    python examples/benchmark_fine.py --model DIR_OR_ID                 # your own weights
    python examples/benchmark_fine.py --from RUN_DIR                    # start from a run's NeRF, not a sphere
    python examples/benchmark_fine.py --tiny-sd mesh.width=64 mesh.height=64 mesh.resolution=32   # CPU smoke

The step is the one `threed run --method magic3d` trains (threed/stages.py's mesh stage: marching
tetrahedra, rasterization, texture field, shading, SDS through the VAE, the regularisers, Adam). Without
--from, the surface is a sphere of radius 0.5 on a grid fitted to it with `mesh.resolution` cells along
its side (about 320k faces at 128, the size of a typical object's), with a fresh texture field. Without
--model, the prior is Stable Diffusion 2.1-base's real architecture (examples/sd21-base-architecture/)
with random weights: speed and memory do not depend on weight values; the renders mean nothing.

Prints (and with --json writes) the median step as a run takes it (`step_ms`, `it_per_s`: one wait for the
device per step), then median milliseconds per phase over as many steps with a wait after each phase
(render / guidance / backward / optimizer; with --profile also the render's parts: extract / rasterize /
texture / antialias), the first step's time (it compiles the guidance where that is on), and peak memory
(CUDA max allocated, or the process's max RSS on a CPU). Medians over --steps after --warmup. A failure
(e.g. out of memory) is reported in the JSON with its message, and the exit status is 1.
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
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_trainer(args, cfg, device: str, run_dir: Path):
    from threed import methods, stages
    from threed.fields.dmtet import DMTetGeometry
    from threed.fields.nerf import NeRFField
    from threed.fields.tetgrid import TetGrid
    from threed.render.background import Background
    from threed.scenes.mesh import MeshScene
    from threed.trainer import Trainer

    stage_cfg = stages.MESH.config(cfg)
    guidance = methods.get(cfg.method).build_guidance(stage_cfg, device)
    torch.manual_seed(cfg.seed)
    if args.from_run:
        from threed import pipeline

        coarse = pipeline.load_trainer(Path(args.from_run), device, stage="nerf")
        level = coarse.scene.export_mesh(progress=False).about["threshold"]  # the NeRF's export level
        scene = MeshScene.from_coarse(stage_cfg, coarse.field, coarse.background, level, device, progress=False)
    else:
        grid = TetGrid.fit([-0.6] * 3, [0.6] * 3, cfg.mesh.resolution)
        geometry = DMTetGeometry.from_sdf(lambda p: p.norm(dim=-1) - 0.5, grid, device=device,
                                          deform=cfg.mesh.deform_scale > 0, deform_scale=cfg.mesh.deform_scale)
        scene = MeshScene(stage_cfg, geometry, NeRFField(cfg.field, cfg.render.bound, device), Background(cfg.render),
                          device)
    return Trainer(stage_cfg, device, guidance, run_dir=run_dir, scene=scene, stage=stages.MESH.name)


def measure(args, device: str, tmp: Path) -> dict:
    from benchmark_step import first_step, guidance_compile_info, phased_steps, timed_steps

    from threed.config import build_config
    from threed.pipeline import load_run_config
    from threed.random_models import benchmark_sd
    from threed.trainer import peak_memory_mb

    model = benchmark_sd(args.model, tmp, args.tiny_sd, Path(args.arch), device)
    tiny = ["guidance.sd.resolution=64"] if args.tiny_sd else []  # the tiny VAE downsamples 2x, not 8x
    base = [f"device={device}", "prompt=a yellow rubber duck", f"guidance.sd.model={model}", *tiny]
    if args.from_run:
        cfg = load_run_config(Path(args.from_run), [*base, *args.overrides])
    else:
        cfg = build_config(args.preset, [*base, *args.overrides])
    setup_start = time.perf_counter()
    trainer = build_trainer(args, cfg, device, tmp / "run")
    setup_s = time.perf_counter() - setup_start
    vertices, faces = trainer.scene.geometry.extract()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first_step_s = first_step(trainer, args.warmup, device)
    # Steps as a run takes them (one wait for the device per step), then again split into phases.
    steps = timed_steps(trainer, args.steps, device)
    trainer.scene.profile = args.profile
    phases, parts = phased_steps(trainer, args.steps)
    med = {k: statistics.median(v) for k, v in phases.items()}
    step = statistics.median(steps)
    return {
        "model": args.model or ("tiny random SD" if args.tiny_sd else "SD-2.1-base architecture, random weights"),
        "start": f"NeRF of {args.from_run}" if args.from_run else "sphere r=0.5",
        "backends": trainer.describe(),
        "render": f"{cfg.mesh.width}x{cfg.mesh.height}", "batch_size": cfg.mesh.batch_size,
        "tet_grid_cells": list(trainer.scene.geometry.grid.cells), "faces": int(faces.shape[0]),
        "vertices": int(vertices.shape[0]), "guidance_resolution": cfg.guidance.sd.resolution,
        "vae": cfg.guidance.sd.vae, "half_precision": cfg.guidance.sd.half_precision and device.startswith("cuda"),
        "guidance_compile": guidance_compile_info(trainer.guidance),
        "setup_s": round(setup_s, 2), "first_step_s": round(first_step_s, 2),
        "steps_timed": args.steps, "warmup": args.warmup,
        "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "render_parts_median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in parts.items()},
        "step_ms": round(step * 1000, 1), "step_ms_max": round(max(steps) * 1000, 1),
        "it_per_s": round(1.0 / step, 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
        "peak_memory_kind": "CUDA max allocated" if device.startswith("cuda") else "process max RSS",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="magic3d")
    p.add_argument("--model", help="SD hub id or folder (default: random real-size SD-2.1-base)")
    p.add_argument("--from", dest="from_run", help="a run directory whose NeRF stage starts the surface")
    p.add_argument("--tiny-sd", action="store_true", help="a tiny random SD instead (CPU smoke test)")
    p.add_argument("--arch", default=str(HERE / "sd21-base-architecture"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also time the render's parts (syncs the device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    from threed.config import resolve_device

    device = resolve_device(args.device)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda")
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "preset": args.preset, "overrides": args.overrides,
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result.update(measure(args, device, Path(tmp)))
        except Exception as e:  # report the failure (e.g. CUDA out of memory) in the JSON, then fail
            result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            traceback.print_exc()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
