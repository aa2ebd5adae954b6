"""Run directories: train a method into one, re-export from one, render views of one.

A run directory holds config.yaml, checkpoints/step-*.pt, metrics.jsonl, mesh.<fmt>, turntable.mp4,
preview.png and report.html (threed/report.py). Later stages (export, bench, view) read only these files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from threed.cameras import Cameras, make_cameras, orbit_cameras
from threed.config import Config, build_config, load_yaml, resolve_device, save_config
from threed.errors import UserError
from threed.io import append_jsonl, atomic_write_text
from threed.report import write_run_report
from threed.trainer import Trainer, list_checkpoints, peak_memory_mb


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out} ({e.strerror}): pass --out to a writable folder") from None


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint holds, from its file name (no need to load it)."""
    from threed.trainer import CHECKPOINT_RE

    match = CHECKPOINT_RE.search(Path(path).name)
    return int(match.group(1)) if match else 0


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"{run_dir} is not a threed run directory (no config.yaml): pass the --out folder of a run")
    return build_config(base=load_yaml(path), overrides=overrides)


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/step-*.pt): train it with `threed run --out {run_dir}`")
    return found[-1]


def load_checkpoint(path: Path, device: str) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): delete it to fall back to an older one") from None


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or continue) a run in `out`, then export its mesh, video and preview."""
    from threed import methods

    out = Path(out)
    device = resolve_device(cfg.device)
    method = methods.get(cfg.method)
    if not cfg.prompt.strip() and cfg.guidance.type != "oracle":
        raise UserError('the prompt is empty: pass --prompt "a yellow rubber duck"')
    created = not out.exists()
    check_writable(out)
    try:
        guidance = method.build_guidance(cfg, device)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no empty run directory behind a failed start
        raise
    trainer = Trainer(cfg, device, guidance, run_dir=out)
    if resume:
        trainer.load_state_dict(load_checkpoint(latest_checkpoint(out), device))
    save_config(cfg, out / "config.yaml")
    if progress:
        print(f"threed: {trainer.describe()} | run directory: {out}", flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats = trainer.fit(cfg.steps, progress=progress)
    peak = peak_memory_mb(device)
    start = time.perf_counter()
    export_run(out, trainer=trainer)
    compile_time = getattr(guidance, "compile_time_s", None)  # inside wall_time_s: the first step compiles
    append_jsonl(out / "metrics.jsonl", {
        "step": trainer.step, "done": True, "wall_time_s": round(stats["train_time_s"], 3),
        "segment_wall_time_s": round(stats["segment_time_s"], 3), "segment_steps": stats["segment_steps"],
        "it_per_s": round(stats["it_per_s"], 4), "peak_memory_mb": round(peak, 1),
        "export_time_s": round(time.perf_counter() - start, 3), "device": device,
        **({"compile_time_s": round(compile_time, 3)} if compile_time is not None else {}),
    })
    write_run_report(out)
    return out


def load_trainer(run_dir: Path, device: str | None = None, overrides: list[str] | None = None) -> Trainer:
    """A guidance-less Trainer holding the run's last checkpoint (for export and evaluation)."""
    cfg = load_run_config(run_dir, overrides)
    device = resolve_device(device or "auto")
    cfg.device = device
    trainer = Trainer(cfg, device, guidance=None, run_dir=Path(run_dir))
    trainer.load_state_dict(load_checkpoint(latest_checkpoint(run_dir), device), weights_only=True)
    trainer.field.eval()
    trainer.background.eval()
    return trainer


@torch.no_grad()
def render_cameras(trainer: Trainer, cameras: Cameras, shading: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (B,H,W,3), opacity float (B,H,W)) rendered one camera at a time."""
    images, opacity = [], []
    for i in range(len(cameras)):
        out = trainer.renderer(trainer.field, trainer.background, cameras.subset(i).to(trainer.device), shading)
        images.append((out.rgb[0].clamp(0, 1) * 255).round().byte().cpu().numpy())
        opacity.append(out.opacity[0, ..., 0].float().cpu().numpy())
    return np.stack(images), np.stack(opacity)


def render_views(run_dir: Path, n_views: int, shading: str, size: int, device: str | None = None,
                 trainer: Trainer | None = None) -> np.ndarray:
    """`n_views` renders (uint8 (n, size, size, 3)) at evenly spaced azimuths, evaluation elevation."""
    trainer = trainer or load_trainer(run_dir, device)
    cams = orbit_cameras(trainer.cfg.camera, n_views, size, size)
    return render_cameras(trainer, cams, shading)[0]


def _silhouette_cameras(cfg: Config, size: int) -> Cameras:
    """Views for choosing the marching-cubes level: an orbit at the evaluation elevation, plus above and below."""
    el = [cfg.camera.eval_elevation] * 6 + [60.0, -30.0]
    az = [i * 60.0 for i in range(6)] + [30.0, 210.0]
    n = len(el)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(torch.tensor(el), torch.tensor(az), full(cfg.camera.eval_distance), full(cfg.camera.eval_fovy),
                        size, size)


def extract(trainer: Trainer, resolution: int | None = None, threshold: float | None = None):
    """The run's mesh: marching cubes at a level chosen by silhouette agreement unless one is given."""
    from threed.mesh import auto_threshold, density_grid, extract_mesh

    cfg = trainer.cfg
    res = resolution or cfg.export.resolution
    field, bound = trainer.field, cfg.render.bound
    grid = density_grid(field.density, bound, res, trainer.device)
    level = cfg.export.threshold if threshold is None else threshold
    if level < 0:
        cams = _silhouette_cameras(cfg, 64)
        _, opacity = render_cameras(trainer, cams, "albedo")
        rays_o, rays_d = cams.rays()
        level = auto_threshold(grid, bound, rays_o, rays_d, torch.from_numpy(opacity))
    mesh = extract_mesh(field.density, field.albedo, bound, res, level, cfg.export.keep_components,
                        cfg.export.decimate_faces, device=trainer.device, grid=grid)
    return mesh, level


def export_run(run_dir: Path, formats: tuple[str, ...] | None = None, resolution: int | None = None,
               threshold: float | None = None, trainer: Trainer | None = None, video: bool | None = None,
               device: str | None = None) -> list[Path]:
    """Write mesh.<fmt> for each format, and turntable.mp4 and preview.png as the config says
    (`video=True`/`False` forces both on or off)."""
    from exporters import export_mesh
    from exporters.video import write_image_grid, write_video

    run_dir = Path(run_dir)
    trainer = trainer or load_trainer(run_dir, device)
    cfg = trainer.cfg
    trainer.field.eval()
    trainer.background.eval()
    mesh, level = extract(trainer, resolution, threshold)
    written = export_mesh(mesh, run_dir, formats or cfg.export.formats)
    if cfg.export.video if video is None else video:
        size = cfg.export.video_resolution
        frames, _ = render_cameras(trainer, orbit_cameras(cfg.camera, cfg.export.video_frames, size, size), "albedo")
        path = run_dir / "turntable.mp4"
        write_video(list(frames), path, cfg.export.video_fps)
        written.append(path)
    n = cfg.export.preview_views if video is None or video else 0
    if n > 0:
        side = max(16, min(256, cfg.export.video_resolution))
        cams = orbit_cameras(cfg.camera, n, side, side)
        colour, _ = render_cameras(trainer, cams, "albedo")
        plain, _ = render_cameras(trainer, cams, "textureless")
        path = run_dir / "preview.png"
        write_image_grid(list(colour) + list(plain), path, cols=n)
        written.append(path)
    info = {"threshold": float(level), "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
    atomic_write_text(run_dir / "mesh.json", json.dumps(info, indent=1))
    written.append(write_run_report(run_dir))  # the page embeds the mesh: rewrite it with every export
    return written


def default_out_dir(cfg: Config) -> Path:
    """outputs/<prompt slug> (or the reference's name), with a numeric suffix if taken."""
    name = cfg.prompt or Path(cfg.guidance.oracle.reference).stem or cfg.method
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:60] or "run"
    base = Path("outputs") / slug
    path, i = base, 1
    while path.exists() and any(path.iterdir()):
        i += 1
        path = Path(f"{base}-{i}")
    return path

