"""Run directories: train a method into one (stage by stage), re-export from one, render views of one.

A run directory holds config.yaml, checkpoints/step-*.pt, metrics.jsonl, mesh.<fmt> (with mesh.json
describing each mesh file), turntable.mp4, preview.png and report.html (threed/report.py); a method with a
mesh stage (Magic3D) adds checkpoints/fine/step-*.pt and keeps its NeRF stage's mesh as mesh-coarse.<fmt>
beside the final mesh.<fmt>. Later steps (export, bench, view) read only these files.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from threed.cameras import Cameras, make_cameras, orbit_cameras
from threed.config import Config, build_config, load_yaml, resolve_device, save_config
from threed.errors import UserError, first_line
from threed.io import append_jsonl, atomic_write_text
from threed import stages
from threed.progress import bar
from threed.report import read_metrics, write_run_report
from threed.stages import load_checkpoint  # noqa: F401  (part of this module's interface)
from threed.trainer import Trainer, list_checkpoints, peak_memory_mb

COARSE = "mesh-coarse"  # file stem of a multi-stage run's NeRF-stage mesh


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


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
        source_checkpoint: Path | None = None) -> list[Path]:
    """Train (or continue) a run in `out`, stage by stage (threed/stages.py), then export its mesh, video and
    preview. With `resume`, finished stages are skipped and an unfinished one continues from its newest
    checkpoint. `source_checkpoint` (magic3d-refine) is a NeRF checkpoint of another run that stands for
    this run's finished NeRF stage: a copy of its weights is written to out/checkpoints. Returns the files
    the exports wrote (for the command's closing summary): the final stage's first, then the earlier ones'."""
    from threed import methods

    out = Path(out)
    device = resolve_device(cfg.device)
    method = methods.get(cfg.method)
    if not cfg.prompt.strip() and cfg.guidance.type != "oracle":
        raise UserError('the prompt is empty: pass --prompt "a yellow rubber duck"')
    created = not out.exists()
    check_writable(out)
    started = False
    coarse: Trainer | None = None  # the NeRF stage, kept in memory for the mesh stage's start
    guidance = None
    done_stats: dict[str, dict] = {}
    written: list[Path] = []
    earlier: list[Path] = []  # files of earlier stages' exports
    for stage in method.stages:
        if stage == "nerf" and source_checkpoint is not None:
            continue  # another run's: its weights are copied once the next stage's prior has loaded
        if resume and stage != method.stages[-1] and stages.finished(out, cfg, stage):
            continue  # (the last stage always runs: a finished one still exports and closes the run's record)
        stage_cfg = stages.stage_config(cfg, stage)
        if coarse is not None:  # free the NeRF stage's prior before loading this stage's
            coarse.guidance = guidance = None
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        try:
            guidance = method.build_guidance(stage_cfg, device)
        except BaseException:
            if not started and created and not any(out.iterdir()):
                out.rmdir()  # leave no empty run directory behind a failed start
            raise
        if not started and source_checkpoint is not None and not list_checkpoints(out):
            copied = copy_nerf_weights(source_checkpoint, out)
            append_jsonl(out / "metrics.jsonl", {"step": cfg.steps, "stage": "nerf", "stage_done": True,
                                                 "copied_from": str(Path(source_checkpoint).resolve()),
                                                 "checkpoint": str(copied.relative_to(out))})
        if stage == "nerf":
            trainer = stages.nerf_trainer(cfg, device, guidance, out, resume=resume)
            if not started:
                save_config(cfg, out / "config.yaml")
        else:
            if not started:
                save_config(cfg, out / "config.yaml")
            init_start = time.perf_counter()
            if not stages.started(out, "mesh"):
                coarse = coarse or stages.nerf_trainer(cfg, device, None, out, resume=True, weights_only=True)
                level = coarse_level(out, coarse, progress, earlier)
            else:
                level = None
            trainer = stages.mesh_trainer(cfg, device, guidance, out, coarse, level, progress=progress)
            coarse = None
            done_stats.setdefault("mesh", {})["init_time_s"] = time.perf_counter() - init_start
        started = True
        if progress:
            tag = f"{stage} stage | " if len(method.stages) > 1 else ""
            print(f"threed: {tag}{trainer.describe()} | run directory: {out}", flush=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stats = trainer.fit(stages.stage_steps(cfg, stage), progress=progress)
        stats["peak_memory_mb"] = peak_memory_mb(device)
        stats["compile_time_s"] = getattr(guidance, "compile_time_s", None)  # inside wall_time_s: the first step
        start = time.perf_counter()
        final = stage == method.stages[-1]
        if final:
            written = export_run(out, trainer=trainer, progress=progress)
        else:
            earlier += coarse_export(out, trainer, progress)
        stats["export_time_s"] = time.perf_counter() - start
        done_stats.setdefault(stage, {}).update(stats)
        if not final:
            append_jsonl(out / "metrics.jsonl", {
                "step": trainer.step, "stage": stage, "stage_done": True, **_stage_record(stats), "device": device})
            coarse = trainer
            continue
        append_jsonl(out / "metrics.jsonl", final_record(out, cfg, method.stages, done_stats, trainer, device))
    write_run_report(out)
    return written + [p for p in earlier if p not in written]


def _stage_record(stats: dict) -> dict:
    compile_time = stats.get("compile_time_s")
    return {"wall_time_s": round(stats["train_time_s"], 3), "segment_wall_time_s": round(stats["segment_time_s"], 3),
            "segment_steps": stats["segment_steps"], "it_per_s": round(stats["it_per_s"], 4),
            "peak_memory_mb": round(stats["peak_memory_mb"], 1), "export_time_s": round(stats["export_time_s"], 3),
            **({"compile_time_s": round(compile_time, 3)} if compile_time is not None else {})}


def final_record(out: Path, cfg: Config, stage_names: tuple[str, ...], done: dict[str, dict], trainer: Trainer,
                 device: str) -> dict:
    """The run's closing metrics.jsonl record. One stage: its numbers, as always. Several: training time and
    steps summed over the stages (`wall_time_s`, `it_per_s`), this segment's (`segment_*`), and each stage's
    own numbers prefixed with its name (`nerf_wall_time_s`, `mesh_it_per_s`, `mesh_init_time_s`, ...); a
    stage finished in an earlier segment contributes the numbers of its record in metrics.jsonl."""
    last = done[stage_names[-1]]
    if len(stage_names) == 1:
        record = _stage_record(last)
        compile_time = record.pop("compile_time_s", None)
        return {"step": trainer.step, "done": True, **record, "device": device,
                **({"compile_time_s": compile_time} if compile_time is not None else {})}
    records, _ = read_metrics(out)
    per_stage: dict[str, dict] = {}
    for name in stage_names:
        if name in done and "train_time_s" in done[name]:
            per_stage[name] = _stage_record(done[name])
            if "init_time_s" in done[name]:
                per_stage[name]["init_time_s"] = round(done[name]["init_time_s"], 3)
        else:
            previous = [r for r in records if r.get("stage") == name and r.get("stage_done")]
            per_stage[name] = {k: v for k, v in previous[-1].items() if k not in ("step", "stage", "stage_done",
                                                                                  "device")} if previous else {}
    total_time = sum(s.get("wall_time_s", 0.0) for s in per_stage.values())
    # it/s over the stages trained here (a refinement's NeRF stage was trained in another run)
    trained_steps = sum(stages.stage_steps(cfg, n) for n in stage_names if "wall_time_s" in per_stage[n])
    trained = [done[n] for n in stage_names if "train_time_s" in done.get(n, {})]
    record = {"step": cfg.steps + trainer.step, "done": True, "wall_time_s": round(total_time, 3),
              "segment_wall_time_s": round(sum(s["segment_time_s"] for s in trained), 3),
              "segment_steps": sum(s["segment_steps"] for s in trained),
              "it_per_s": round(trained_steps / total_time, 4) if total_time > 0 else 0.0,
              "peak_memory_mb": round(max(s["peak_memory_mb"] for s in trained), 1),
              "export_time_s": round(last["export_time_s"], 3), "device": device}
    for name, values in per_stage.items():
        record.update({f"{name}_{k}": v for k, v in values.items() if k != "segment_steps"})
    return record


def copy_nerf_weights(source: Path, out: Path) -> Path:
    """Copy a NeRF checkpoint's weights (not its optimiser state, which a refinement never uses) into
    out/checkpoints under the same step-*.pt name; returns the new file."""
    from threed.io import atomic_torch_save

    state = load_checkpoint(source, "cpu")
    keep = {k: state[k] for k in ("step", "field", "background", "renderer", "config") if k in state}
    keep["copied_from"] = str(Path(source).resolve())
    path = out / "checkpoints" / Path(source).name
    atomic_torch_save(keep, path)
    return path


def coarse_export(run_dir: Path, trainer: Trainer, progress: bool | None = True) -> list[Path]:
    """The NeRF stage's mesh of a multi-stage run: mesh-coarse.<fmt> (vertex colours), described in mesh.json
    with its level and step."""
    return export_run(run_dir, trainer=trainer, video=False, name=COARSE, texture=False, progress=progress)


def _coarse_entry(run_dir: Path, step: int) -> dict | None:
    """mesh.json's entry of a mesh-coarse file exported from the NeRF stage at `step`, if any."""
    try:
        meshes = json.loads((Path(run_dir) / MESH_METADATA).read_text()).get("meshes", {})
    except (OSError, ValueError, AttributeError):
        return None
    for name, entry in meshes.items():
        if (name.startswith(f"{COARSE}.") and isinstance(entry, dict) and entry.get("step") == step
                and isinstance(entry.get("threshold"), (int, float))):
            return entry
    return None


def coarse_level(run_dir: Path, coarse: Trainer, progress: bool | None = True,
                 written: list[Path] | None = None) -> float:
    """The density level of the NeRF stage's mesh, where the mesh stage's surface starts: mesh.json's, when
    mesh-coarse was exported from the same step, else exported (again) now (its files added to `written`)."""
    entry = _coarse_entry(run_dir, coarse.step)
    if entry is None:
        if progress:
            print(f"threed: exporting the NeRF stage's mesh ({COARSE}.*) to start the mesh stage from", flush=True)
        files = coarse_export(run_dir, coarse, progress)
        if written is not None:
            written += files
        entry = _coarse_entry(run_dir, coarse.step)
        assert entry is not None, "the coarse export records its level in mesh.json"
    return float(entry["threshold"])


def stage_progress(run_dir: Path, cfg: Config) -> list[tuple[str, int, int]]:
    """(stage, step of its newest checkpoint, its step count) for each stage of the run's method."""
    from threed import methods

    return [(s, stages.latest_step(run_dir, s), stages.stage_steps(cfg, s)) for s in methods.get(cfg.method).stages]


def load_trainer(run_dir: Path, device: str | None = None, overrides: list[str] | None = None,
                 stage: str | None = None) -> Trainer:
    """A guidance-less Trainer holding the run's last checkpoint (for export and evaluation): that of `stage`,
    by default the last stage that has one."""
    from threed import methods

    cfg = load_run_config(run_dir, overrides)
    device = resolve_device(device or "auto")
    cfg.device = device
    names = methods.get(cfg.method).stages
    if stage is None:
        stage = next((s for s in reversed(names) if s != "nerf" and stages.started(run_dir, s)), "nerf")
    if stage == "mesh":
        trainer = stages.mesh_trainer(cfg, device, None, Path(run_dir), weights_only=True)
    else:
        trainer = Trainer(cfg, device, guidance=None, run_dir=Path(run_dir))
        trainer.load_state_dict(load_checkpoint(latest_checkpoint(run_dir), device), weights_only=True)
    trainer.scene.eval()
    return trainer


@torch.no_grad()
def render_cameras(trainer: Trainer, cameras: Cameras, shading: str, progress: bool | None = False,
                   desc: str = "rendering") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (B,H,W,3), opacity float (B,H,W)) rendered one camera at a time; `progress` shows a
    bar named `desc` over the views."""
    images, opacity = [], []
    with bar(desc, len(cameras), progress, unit="view") as shown:
        for i in range(len(cameras)):
            out = trainer.scene.render(cameras.subset(i).to(trainer.device), shading)
            images.append((out.rgb[0].clamp(0, 1) * 255).round().byte().cpu().numpy())
            opacity.append(out.opacity[0, ..., 0].float().cpu().numpy())
            shown.update(1)
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


def extract(trainer: Trainer, resolution: int | None = None, threshold: float | None = None,
            progress: bool | None = False):
    """The run's mesh: marching cubes at a level chosen by silhouette agreement unless one is given.

    Uses only the field as it is (trained or not): a run exported at step 0 gives the initial blob.
    """
    from threed.mesh import auto_threshold, density_grid, extract_mesh

    cfg = trainer.cfg
    res = resolution or cfg.export.resolution
    field, bound = trainer.field, cfg.render.bound
    grid = density_grid(field.density, bound, res, trainer.device, progress=progress)
    level = cfg.export.threshold if threshold is None else threshold
    if level < 0:
        cams = _silhouette_cameras(cfg, 64)
        _, opacity = render_cameras(trainer, cams, "albedo", progress, "mesh level: silhouettes")
        rays_o, rays_d = cams.rays()
        level = auto_threshold(grid, bound, rays_o, rays_d, torch.from_numpy(opacity), progress=progress)
    mesh = extract_mesh(field.density, field.albedo, bound, res, level, cfg.export.keep_components,
                        cfg.export.decimate_faces, device=trainer.device, grid=grid, progress=progress)
    return mesh, level


MESH_METADATA = "mesh.json"
# pip names of modules an optional artifact's writer imports, for the install hint
_PIP_NAMES = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg"}


def warn(message: str) -> None:
    print(f"threed: warning: {message}", file=sys.stderr, flush=True)


def _why_not_written(e: Exception) -> str:
    """One line: what is missing and how to install it, or what went wrong."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        module = e.name.split(".")[0]
        return f"{module} is not installed (pip install {_PIP_NAMES.get(module, module)})"
    if isinstance(e, ImportError):
        return first_line(e)
    return f"{type(e).__name__}: {first_line(e)}"


def _write_optional(name: str, write: Callable[[], Path], written: list[Path]) -> None:
    """Write an optional artifact; if that fails, one warning line and the export goes on (the mesh is
    what a run is for; a missing MP4 encoder must not turn a finished run into a failed one)."""
    try:
        written.append(write())
    except Exception as e:  # any failure of an optional file; Ctrl-C still stops the export
        warn(f"{name} not written: {_why_not_written(e)}; the mesh and other files are written")


def write_mesh_metadata(run_dir: Path, entries: dict[str, dict]) -> Path:
    """Update mesh.json: one entry per mesh file, keyed by its file name.

    Why one entry per file: exports can write different meshes (another resolution, level or format) to
    the same run directory, so one record for "the mesh" could describe another mesh than mesh.glb. An
    export replaces the entries of exactly the files it wrote; entries of files that no longer exist are
    dropped; a mesh.json of the old single-record layout is discarded (it cannot say which file it meant).
    """
    path = Path(run_dir) / MESH_METADATA
    meshes: dict[str, dict] = {}
    try:
        old = json.loads(path.read_text())
        if isinstance(old, dict) and isinstance(old.get("meshes"), dict):
            meshes = {k: v for k, v in old["meshes"].items() if (Path(run_dir) / k).is_file()}
    except (OSError, ValueError):
        pass
    meshes.update(entries)
    atomic_write_text(path, json.dumps({"meshes": dict(sorted(meshes.items()))}, indent=1))
    return path


def export_run(run_dir: Path, formats: tuple[str, ...] | None = None, resolution: int | None = None,
               threshold: float | None = None, trainer: Trainer | None = None, video: bool | None = None,
               device: str | None = None, progress: bool | None = None, name: str | None = None,
               texture: bool | None = None, texture_size: int | None = None) -> list[Path]:
    """Write <name>.<fmt> for each format (and mesh.json describing each), and turntable.mp4 and preview.png
    as the config says (`video=True`/`False` forces both on or off). Returns every file written.

    The mesh is that of the trainer's scene (by default the run's last stage): marching cubes of a NeRF
    (`resolution`, `threshold`), or a mesh stage's DMTet surface. `name` defaults to mesh, or mesh-coarse
    for the NeRF stage of a method with later stages. With `texture` (default export.texture) OBJ and GLB
    carry a baked albedo texture (threed/texture.py) of the field that gives the vertex colours; PLY keeps
    vertex colours. Each step shows a progress bar (`progress`: True, False, or None for only when stderr
    is a terminal). The video and preview are optional: if one cannot be written (e.g. no MP4 encoder), a
    one-line warning says why and the export still succeeds. Works on an untrained field too.
    """
    from exporters import UnknownFormatError, check_formats, export_mesh
    import exporters.video as video_writer
    from threed import methods
    from threed.scenes.mesh import MeshScene

    run_dir = Path(run_dir)
    trainer = trainer or load_trainer(run_dir, device)
    cfg = trainer.cfg
    try:
        formats = tuple(check_formats(formats or cfg.export.formats))  # before minutes of extraction
    except UnknownFormatError as e:
        raise UserError(f"{e} (--format or export.formats)") from None
    trainer.scene.eval()
    if isinstance(trainer.scene, MeshScene):
        if resolution is not None or threshold is not None:
            raise UserError("--resolution and --threshold set a NeRF's marching cubes; this run's mesh comes from "
                            "its mesh stage (DMTet): drop them")
        mesh = trainer.scene.export_mesh(cfg.export.keep_components, cfg.export.decimate_faces)
        about: dict = {"stage": "mesh", "tet_grid_cells": list(trainer.scene.geometry.grid.cells)}
        albedo_fn, inset = trainer.scene.texture.albedo, 0.0  # trained on the surface itself
    else:
        res = resolution or cfg.export.resolution
        mesh, level = extract(trainer, res, threshold, progress)
        chosen = "given" if (cfg.export.threshold if threshold is None else threshold) >= 0 else "auto"
        about = {"threshold": float(level), "threshold_chosen": chosen, "resolution": int(res),
                 "bound": float(cfg.render.bound)}
        if len(methods.get(cfg.method).stages) > 1:
            about["stage"] = "nerf"
            name = name or COARSE
        # read half a marching-cubes cell inside, as the vertex colours are (threed.mesh.extract_mesh)
        albedo_fn, inset = trainer.field.albedo, cfg.render.bound / (res - 1)
    name = name or "mesh"
    about.update(decimate_faces=int(cfg.export.decimate_faces), step=int(trainer.step))
    bake = cfg.export.texture if texture is None else texture
    textured = [f for f in formats if f in ("obj", "glb")] if bake else []
    plain = [f for f in formats if f not in textured]
    written = (export_mesh(run_dir, plain, mesh.vertices, mesh.faces, mesh.colors, mesh.normals, stem=name)
               if plain else [])
    meshes = {p.name: {"format": p.suffix[1:], "bytes": p.stat().st_size, "vertices": int(len(mesh.vertices)),
                       "faces": int(len(mesh.faces)), **about}
              for p in written if p.suffix[1:] in plain}
    if textured:
        from threed.texture import export_textured

        size = texture_size or cfg.export.texture_size
        timings: dict[str, float] = {}
        files = export_textured(mesh.vertices, mesh.faces, albedo_fn, run_dir, textured, size,
                                cfg.export.texture_max_faces, trainer.device,
                                sys.stderr.isatty() if progress is None else progress, name=name,
                                inset=inset, timings=timings)
        written += files
        for p in files:
            if p.suffix[1:] in textured:
                meshes[p.name] = {"format": p.suffix[1:], "bytes": p.stat().st_size, "texture_size": int(size),
                                  "faces_before_decimation": int(len(mesh.faces)),
                                  "decimated_to_at_most": int(cfg.export.texture_max_faces), **about,
                                  "texture_time_s": {k: round(v, 3) for k, v in timings.items()}}
    written.append(write_mesh_metadata(run_dir, meshes))

    if cfg.export.video if video is None else video:
        def turntable() -> Path:
            video_writer.require_mp4_writer()  # before rendering frames that could not be written
            size = cfg.export.video_resolution
            cams = orbit_cameras(cfg.camera, cfg.export.video_frames, size, size)
            frames, _ = render_cameras(trainer, cams, "albedo", progress, "turntable frames")
            return video_writer.write_video(list(frames), run_dir / "turntable.mp4", cfg.export.video_fps,
                                            progress=progress)

        _write_optional("turntable.mp4", turntable, written)
    n = cfg.export.preview_views if video is None or video else 0
    if n > 0:
        def preview() -> Path:
            side = max(16, min(256, cfg.export.video_resolution))
            cams = orbit_cameras(cfg.camera, n, side, side)
            colour, _ = render_cameras(trainer, cams, "albedo", progress, "preview: colour")
            plain, _ = render_cameras(trainer, cams, "textureless", progress, "preview: textureless")
            return video_writer.write_image_grid(list(colour) + list(plain), run_dir / "preview.png", cols=n)

        _write_optional("preview.png", preview, written)
    written.append(write_run_report(run_dir))  # the page embeds the mesh: rewrite it with every export
    return written


def chamfer_line(mesh_path: Path | str, reference: Path | str) -> str:
    """One line: the Chamfer-L1 distance (and F-score) from the mesh file to the reference mesh."""
    import trimesh

    from threed.metrics import mesh_distance

    try:
        ref = trimesh.load(reference, force="mesh")
    except Exception as e:  # trimesh raises many types for unreadable files
        raise UserError(f"cannot read the reference mesh {reference} ({first_line(e)}): "
                        "pass an OBJ, PLY or GLB") from None
    pred = trimesh.load(mesh_path, force="mesh")
    if len(pred.faces) == 0 or len(ref.faces) == 0:
        return f"Chamfer-L1 from {Path(mesh_path).name} to {Path(reference).name}: undefined (a mesh is empty)"
    d = mesh_distance(pred, ref)
    return (f"Chamfer-L1 from {Path(mesh_path).name} to {Path(reference).name}: {d['chamfer_l1']:.4g} "
            f"({100 * d['chamfer_l1_rel']:.2f}% of the reference's diagonal), F-score@1%: {d['fscore_1pct']:.3f}")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def written_summary(paths: Sequence[Path | str], reference: Path | str | None = None) -> str:
    """What a finished command wrote, for its last lines: the files with their sizes, and given a
    reference mesh, the Chamfer distance from the (first) exported mesh to it."""
    paths = [Path(p) for p in dict.fromkeys(paths)]
    folders = {p.parent for p in paths}
    common = folders.pop() if len(folders) == 1 else None
    lines = [f"threed: wrote {len(paths)} file{'s' if len(paths) != 1 else ''}" + (f" in {common}:" if common else ":")]
    width = max((len(p.name if common else str(p)) for p in paths), default=0)
    for p in paths:
        size = _size(p.stat().st_size) if p.exists() else "missing"
        lines.append(f"  {(p.name if common else str(p)).ljust(width)}  {size}")
    if reference is not None:
        mesh = next((p for p in paths if p.suffix in (".obj", ".ply", ".glb") and p.exists()), None)
        lines.append("threed: " + (chamfer_line(mesh, reference) if mesh else "no mesh was written to compare "
                                   f"with {Path(reference).name}"))
    return "\n".join(lines)


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


def default_refine_dir(source: Path) -> Path:
    """SOURCE-refine beside the run being refined, with a numeric suffix if taken."""
    base = Path(str(Path(source)).rstrip("/\\") + "-refine")
    path, i = base, 1
    while path.exists() and any(path.iterdir()):
        i += 1
        path = Path(f"{base}-{i}")
    return path
