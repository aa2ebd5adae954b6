"""Runs: train a method into a run directory stage by stage, continue one, re-export one, render views of one.

The run directory's layout is threed/rundir.py's; a method's stages are threed/stages.py's, run here by one
loop: each stage starts fresh or from the stage before it, trains, and exports (the last stage the run's
mesh.<fmt>, turntable and preview; an earlier one its kept mesh-<stage>.<fmt>). Whether a resumed run has
anything left to train is decided here too (`check_resume`). Later steps (export, bench, view) read only the
run directory's files.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from threed import methods
from threed.cameras import orbit_cameras
from threed.config import Config, build_config, load_yaml, resolve_device, save_config
from threed.errors import UserError, first_line
from threed.export import export_stage, kept_mesh_entry
from threed.io import atomic_torch_save
from threed.metrics import reference_metrics
from threed.report import write_run_report
from threed.rundir import FINAL_MESH, RunDir, load_checkpoint, stage_mesh_stem
from threed.scenes import render_each
from threed.stages import Stage, offsets
from threed.trainer import Trainer, peak_memory_mb


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out} ({e.strerror}): pass --out to a writable folder") from None


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    run = RunDir(run_dir)
    if not run.is_run():
        raise UserError(f"{run_dir} is not a threed run directory (no config.yaml): pass the --out folder of a run")
    return build_config(base=load_yaml(run.config_path), overrides=overrides)


def _free(trainer: Trainer | None, device: str) -> None:
    """Drop a finished stage's prior before the next stage loads its own."""
    if trainer is None:
        return
    trainer.guidance = None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run(cfg: Config, out: Path, resume: bool = False, progress: bool = True,
        source_checkpoint: Path | None = None) -> list[Path]:
    """Train (or continue) a run in `out`, stage by stage (threed/stages.py), then export its mesh, video and
    preview. With `resume`, the folder is first brought to today's layout, finished stages are skipped and an
    unfinished one continues from its newest checkpoint. `source_checkpoint` (magic3d-refine) is a checkpoint
    of another run's first stage that stands for this run's finished first stage: a copy of its weights is
    written into `out`. Returns the files the exports wrote (for the command's closing summary): the final
    stage's first, then the earlier ones'."""
    out = Path(out)
    rundir = RunDir(out)
    device = resolve_device(cfg.device)
    method = methods.get(cfg.method)
    if not cfg.prompt.strip() and cfg.guidance.type != "oracle" and not method.image:
        raise UserError('the prompt is empty: pass --prompt "a yellow rubber duck"')
    created = not out.exists()
    check_writable(out)
    if resume:
        rundir.migrate()
    stages, first_steps = method.stages, offsets(method.stages, cfg)
    started = False
    previous: Trainer | None = None  # the stage before, kept in memory for the next stage's start
    done_stats: dict[str, dict] = {}
    written: list[Path] = []
    earlier: list[Path] = []  # files of earlier stages' exports
    for i, stage in enumerate(stages):
        final = i == len(stages) - 1
        if i == 0 and source_checkpoint is not None:
            continue  # another run's: its weights are copied once the next stage's prior has loaded
        if resume and not final and stage.finished(rundir, cfg):
            continue  # (the last stage always runs: a finished one still exports and closes the run's record)
        _free(previous, device)
        try:
            guidance = method.build_guidance(stage.config(cfg), device, stage)
        except BaseException:
            if not started and created and not any(out.iterdir()):
                out.rmdir()  # leave no empty run directory behind a failed start
            raise
        if not started:
            if source_checkpoint is not None and rundir.latest_checkpoint(stages[0].name) is None:
                copied = copy_weights(source_checkpoint, rundir, stages[0].name)
                rundir.append_metrics({"step": first_steps[1], "stage": stages[0].name, "stage_done": True,
                                       "copied_from": str(Path(source_checkpoint).resolve()),
                                       "checkpoint": str(copied.relative_to(out))})
            save_config(cfg, rundir.config_path)
            started = True
        init_start = time.perf_counter()
        trainer = start_stage(cfg, device, guidance, rundir, method.stages, i, previous, progress, earlier)
        previous = None
        if stage.start is not None:
            done_stats.setdefault(stage.name, {})["init_time_s"] = time.perf_counter() - init_start
        if progress:
            tag = f"{stage.name} stage | " if len(stages) > 1 else ""
            print(f"threed: {tag}{trainer.describe()} | run directory: {out}", flush=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stats = trainer.fit(stage.steps(cfg), progress=progress)
        stats["peak_memory_mb"] = peak_memory_mb(device)
        stats["compile_time_s"] = getattr(guidance, "compile_time_s", None)  # inside wall_time_s: the first step
        export_start = time.perf_counter()
        if final:
            written = export_run(out, trainer=trainer, progress=progress)
        else:
            earlier += export_kept(rundir, trainer, progress)
        stats["export_time_s"] = time.perf_counter() - export_start
        done_stats.setdefault(stage.name, {}).update(stats)
        if not final:
            rundir.append_metrics({"step": first_steps[i] + trainer.step, "stage": stage.name, "stage_done": True,
                                   **_stage_record(stats), "device": device})
            previous = trainer
            continue
        record = final_record(rundir, cfg, stages, done_stats, trainer, device)
        if cfg.guidance.type == "oracle" and cfg.guidance.oracle.reference:
            record.update(reference_metrics(stage_meshes(rundir, stages), cfg.guidance.oracle.reference))
        if hasattr(trainer.scene, "reference_metrics"):  # image-to-3D: the reference view against the image
            try:
                record.update(trainer.scene.reference_metrics())
            except UserError as e:  # the input image moved away since the run started
                print(f"threed: warning: no reference-view metrics: {e}", flush=True)
        rundir.append_metrics(record)
    write_run_report(out)
    return written + [p for p in earlier if p not in written]


def start_stage(cfg: Config, device: str, guidance, rundir: RunDir, stages: tuple[Stage, ...], i: int,
                previous: Trainer | None = None, progress: bool = True, written: list[Path] | None = None) -> Trainer:
    """Stage `i`'s trainer: from its newest checkpoint if it has one; else, for a stage that starts from the
    one before it, from that stage's trainer (`previous`, or loaded from its newest checkpoint) and kept mesh
    (exported now if it is missing, its files added to `written`); else fresh."""
    stage = stages[i]
    offset = offsets(stages, cfg)[i]
    if stage.start is None or rundir.latest_checkpoint(stage.name) is not None:
        return stage.trainer(cfg, device, guidance, rundir, offset)
    before = stages[i - 1]
    previous = previous or before.trainer(cfg, device, None, rundir, offsets(stages, cfg)[i - 1], weights_only=True)
    kept = kept_mesh_entry(rundir.path, before.name, previous.step)
    if kept is None:
        if progress:
            print(f"threed: exporting the {before.name} stage's mesh ({stage_mesh_stem(before.name)}.*) to start "
                  f"the {stage.name} stage from", flush=True)
        files = export_kept(rundir, previous, progress)
        if written is not None:
            written += files
        kept = kept_mesh_entry(rundir.path, before.name, previous.step)
        assert kept is not None, "an earlier stage's export records its mesh in mesh.json"
    return stage.trainer(cfg, device, guidance, rundir, offset, previous=previous, kept=kept, progress=progress)


def export_kept(rundir: RunDir, trainer: Trainer, progress: bool | None = True) -> list[Path]:
    """The mesh an earlier stage leaves behind, mesh-<stage>.<fmt> (vertex colours, no video), described in
    mesh.json with its step (and a NeRF's level, where the next stage's surface starts)."""
    return export_stage(rundir.path, trainer, stage=trainer.stage, stem=stage_mesh_stem(trainer.stage),
                        texture=False, video=False, progress=progress)


def _stage_record(stats: dict) -> dict:
    compile_time = stats.get("compile_time_s")
    return {"wall_time_s": round(stats["train_time_s"], 3), "segment_wall_time_s": round(stats["segment_time_s"], 3),
            "segment_steps": stats["segment_steps"], "it_per_s": round(stats["it_per_s"], 4),
            "peak_memory_mb": round(stats["peak_memory_mb"], 1), "export_time_s": round(stats["export_time_s"], 3),
            **({"compile_time_s": round(compile_time, 3)} if compile_time is not None else {})}


def final_record(rundir: RunDir, cfg: Config, stages: tuple[Stage, ...], done: dict[str, dict], trainer: Trainer,
                 device: str) -> dict:
    """The run's closing metrics.jsonl record. One stage: its numbers, as always. Several: training time and
    steps summed over the stages (`wall_time_s`, `it_per_s`), this segment's (`segment_*`), and each stage's
    own numbers prefixed with its name (`nerf_wall_time_s`, `mesh_it_per_s`, `mesh_init_time_s`, ...); a
    stage finished in an earlier segment contributes the numbers of its record in metrics.jsonl."""
    last = done[stages[-1].name]
    if len(stages) == 1:
        record = _stage_record(last)
        compile_time = record.pop("compile_time_s", None)
        return {"step": trainer.step, "done": True, **record, "device": device,
                **({"compile_time_s": compile_time} if compile_time is not None else {})}
    previous = rundir.stage_records()
    per_stage: dict[str, dict] = {}
    for stage in stages:
        name = stage.name
        if name in done and "train_time_s" in done[name]:
            per_stage[name] = _stage_record(done[name])
            if "init_time_s" in done[name]:
                per_stage[name]["init_time_s"] = round(done[name]["init_time_s"], 3)
        else:
            per_stage[name] = {k: v for k, v in previous.get(name, {}).items()
                               if k not in ("step", "stage", "stage_done", "device")}
    total_time = sum(s.get("wall_time_s", 0.0) for s in per_stage.values())
    # it/s over the stages trained here (a refinement's first stage was trained in another run)
    trained_steps = sum(s.steps(cfg) for s in stages if "wall_time_s" in per_stage[s.name])
    trained = [done[s.name] for s in stages if "train_time_s" in done.get(s.name, {})]
    record = {"step": offsets(stages, cfg)[-1] + trainer.step, "done": True, "wall_time_s": round(total_time, 3),
              "segment_wall_time_s": round(sum(s["segment_time_s"] for s in trained), 3),
              "segment_steps": sum(s["segment_steps"] for s in trained),
              "it_per_s": round(trained_steps / total_time, 4) if total_time > 0 else 0.0,
              "peak_memory_mb": round(max(s["peak_memory_mb"] for s in trained), 1),
              "export_time_s": round(last["export_time_s"], 3), "device": device}
    for name, values in per_stage.items():
        record.update({f"{name}_{k}": v for k, v in values.items() if k != "segment_steps"})
    return record


def stage_meshes(rundir: RunDir, stages: tuple[Stage, ...]) -> dict[str, Path | None]:
    """Each stage's mesh file (the last stage's mesh.*, an earlier one's mesh-<stage>.*; OBJ, PLY or GLB,
    None if none was written) under its closing-record prefix: "" for one stage, else "<stage>_"."""
    out: dict[str, Path | None] = {}
    for i, stage in enumerate(stages):
        stem = FINAL_MESH if i == len(stages) - 1 else stage_mesh_stem(stage.name)
        out["" if len(stages) == 1 else f"{stage.name}_"] = rundir.mesh_file(stem)
    return out


def copy_weights(source: Path, rundir: RunDir, stage: str) -> Path:
    """Copy a checkpoint's weights (not its optimiser state, which a refinement never uses) into `stage`'s
    checkpoint folder under the same step-*.pt name; returns the new file."""
    state = load_checkpoint(source, "cpu")
    keep = {k: state[k] for k in ("step", "field", "background", "renderer", "config") if k in state}
    keep["copied_from"] = str(Path(source).resolve())
    path = rundir.stage_dir(stage) / Path(source).name
    atomic_torch_save(keep, path)
    return path


def check_resume(run_dir: Path, saved: Config, cfg: Config, steps_given: bool = False) -> str | None:
    """Whether `threed run --resume` has anything to train, with `cfg` the run's config as resumed (`saved`
    with the user's options): None if it has; else the line saying the run is finished. An error for a
    change that cannot take effect: a stage's steps changed after the next stage started from it (or taken
    from another run), or a finished run's last stage not made longer."""
    rundir = RunDir(run_dir)
    method = methods.get(cfg.method)
    rundir.migrate()
    if not rundir.has_checkpoint():
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/<stage>/step-*.pt): train it with "
                        f"`threed run --out {run_dir}`")
    progress = [(stage, rundir.latest_step(stage.name), stage.steps(cfg)) for stage in method.stages]
    last, last_step, last_steps = progress[-1]
    for i, (stage, _, steps) in enumerate(progress[:-1]):
        nxt = progress[i + 1][0]
        if steps != stage.steps(saved) and (rundir.latest_checkpoint(nxt.name) is not None or method.refines):
            key = "--steps" if not stage.section else stage.steps_key
            why = "it comes from another run" if method.refines else f"the {nxt.name} stage has started from it"
            raise UserError(f"{key} cannot change the {stage.name} stage of {run_dir}: {why}; pass "
                            f"{last.steps_key}=N to train the {last.name} stage on")
    if any(step < steps for _, step, steps in progress):
        return None
    key = "--steps" if len(progress) == 1 else last.steps_key
    if last_steps != last.steps(saved) or steps_given:
        if len(progress) == 1:
            raise UserError(f"--steps {last_steps} is not beyond the run's step {last_step}: pass a larger --steps")
        raise UserError(f"{key}={last_steps} is not beyond the {last.name} stage's step {last_step}: pass a "
                        f"larger {key}")
    if len(progress) == 1:
        return (f"threed: {run_dir} is finished (step {last_step} of {last_steps}); nothing changed. Pass --steps N "
                f"(N > {last_step}) to train on, or re-export with `threed export {run_dir}`")
    done = "; ".join(f"{s.name} stage step {step} of {steps}" for s, step, steps in progress)
    return (f"threed: {run_dir} is finished ({done}); nothing changed. Pass {key}=N (N > {last_step}) to train "
            f"the {last.name} stage on, or re-export with `threed export {run_dir}`")


def load_trainer(run_dir: Path, device: str | None = None, overrides: list[str] | None = None,
                 stage: str | None = None) -> Trainer:
    """A guidance-less Trainer holding the run's newest checkpoint (for export and evaluation): that of
    `stage`, by default of the last stage that has one. A 0.1 run folder is brought to today's layout first."""
    cfg = load_run_config(run_dir, overrides)
    device = resolve_device(device or "auto")
    cfg.device = device
    rundir = RunDir(run_dir)
    rundir.migrate()
    stages = methods.get(cfg.method).stages
    with_checkpoint = [i for i, s in enumerate(stages) if rundir.latest_checkpoint(s.name) is not None]
    if stage is not None:
        with_checkpoint = [i for i in with_checkpoint if stages[i].name == stage]
    if not with_checkpoint:
        raise UserError(f"{run_dir} has no checkpoint (checkpoints/<stage>/step-*.pt): train it with "
                        f"`threed run --out {run_dir}`")
    i = with_checkpoint[-1]
    trainer = stages[i].trainer(cfg, device, None, rundir, offsets(stages, cfg)[i], weights_only=True)
    trainer.scene.eval()
    return trainer


def render_views(run_dir: Path, n_views: int, shading: str, size: int, device: str | None = None,
                 trainer: Trainer | None = None) -> np.ndarray:
    """`n_views` renders (uint8 (n, size, size, 3)) at evenly spaced azimuths, evaluation elevation."""
    trainer = trainer or load_trainer(run_dir, device)
    cams = orbit_cameras(trainer.cfg.camera, n_views, size, size)
    return render_each(trainer.scene, cams, shading, trainer.device)[0]


def export_run(run_dir: Path, formats: tuple[str, ...] | None = None, resolution: int | None = None,
               threshold: float | None = None, trainer: Trainer | None = None, video: bool | None = None,
               device: str | None = None, progress: bool | None = None, name: str | None = None,
               texture: bool | None = None, texture_size: int | None = None) -> list[Path]:
    """Export the run's mesh from `trainer` (default: the newest checkpoint of its last stage that has one)
    with threed/export.py, then rewrite report.html (the page embeds the mesh). The file stem `name` defaults
    to mesh for the method's last stage and mesh-<stage> for an earlier one. Returns every file written."""
    trainer = trainer or load_trainer(run_dir, device)
    stages = methods.get(trainer.cfg.method).stages
    final = trainer.stage == stages[-1].name
    stem = name or (FINAL_MESH if final else stage_mesh_stem(trainer.stage))
    written = export_stage(run_dir, trainer, stage=trainer.stage, stem=stem, formats=formats, resolution=resolution,
                           threshold=threshold, texture=texture, texture_size=texture_size, video=video,
                           progress=progress)
    written.append(write_run_report(run_dir))
    return written


def chamfer_line(mesh_path: Path | str, reference: Path | str) -> str:
    """One line: the Chamfer-L1 distance, F-score and normal consistency from the mesh file to the reference
    mesh (threed/metrics.py)."""
    from threed.metrics import file_distance, load_mesh

    try:
        ref = load_mesh(reference)
    except Exception as e:  # trimesh raises many types for unreadable files
        raise UserError(f"cannot read the reference mesh {reference} ({first_line(e)}): "
                        "pass an OBJ, PLY or GLB") from None
    pred = load_mesh(mesh_path)
    if len(pred.faces) == 0 or len(ref.faces) == 0:
        return f"Chamfer-L1 from {Path(mesh_path).name} to {Path(reference).name}: undefined (a mesh is empty)"
    d = file_distance(mesh_path, reference)
    return (f"Chamfer-L1 from {Path(mesh_path).name} to {Path(reference).name}: {d['chamfer_l1']:.4g} "
            f"({100 * d['chamfer_l1_rel']:.2f}% of the reference's diagonal), F-score@1%: {d['fscore_1pct']:.3f}, "
            f"normal consistency: {d['normal_consistency']:.4f}")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _is_point_cloud(path: Path) -> bool:
    """Points without faces (the Gaussians' .ply): not a surface, so no distance to a reference is given for
    it. An exported mesh that came out empty has no points, and keeps its "undefined" line. A surface is told
    by the cached load `chamfer_line` reads again; only a file without faces is read a second time, as is."""
    import trimesh

    from threed.metrics import load_mesh

    try:
        if len(load_mesh(path).faces):
            return False
        loaded = trimesh.load(path)
    except Exception:  # unreadable: chamfer_line says so
        return False
    return len(getattr(loaded, "vertices", ())) > 0 and len(getattr(loaded, "faces", ())) == 0


def written_summary(paths: Sequence[Path | str], reference: Path | str | None = None) -> str:
    """What a finished command wrote, for its last lines: the files with their sizes, and given a
    reference mesh, the distances to it (`chamfer_line`) of the first mesh file of each name written
    (mesh.obj, then an earlier stage's kept mesh-nerf.obj, in the order written; point clouds left out)."""
    paths = [Path(p) for p in dict.fromkeys(paths)]
    folders = {p.parent for p in paths}
    common = folders.pop() if len(folders) == 1 else None
    lines = [f"threed: wrote {len(paths)} file{'s' if len(paths) != 1 else ''}" + (f" in {common}:" if common else ":")]
    width = max((len(p.name if common else str(p)) for p in paths), default=0)
    for p in paths:
        size = _size(p.stat().st_size) if p.exists() else "missing"
        lines.append(f"  {(p.name if common else str(p)).ljust(width)}  {size}")
    if reference is not None:
        first: dict[str, Path] = {}  # the first mesh file of each stem
        for p in paths:
            if p.suffix in (".obj", ".ply", ".glb") and p.exists() and p.stem not in first and not _is_point_cloud(p):
                first[p.stem] = p
        lines += [f"threed: {chamfer_line(mesh, reference)}" for mesh in first.values()] or [
            f"threed: no mesh was written to compare with {Path(reference).name}"]
    return "\n".join(lines)


def default_out_dir(cfg: Config) -> Path:
    """outputs/<prompt slug> (or the input image's or the reference's name), with a numeric suffix if taken."""
    name = cfg.prompt or Path(cfg.image.path).stem or Path(cfg.guidance.oracle.reference).stem or cfg.method
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
