"""A trained stage, written into its run folder: the mesh (OBJ, GLB, PLY; vertex colours or a baked albedo
texture), its mesh.json entry, and the turntable video and preview grid.

Whatever the scene (a NeRF's marching cubes, a mesh stage's DMTet surface), it hands over its surface through
`export_mesh` (threed/scenes/__init__.py: ExportedMesh), so nothing here switches on the kind of scene. The
video and preview are optional: one that cannot be written (e.g. no MP4 encoder) is a warning naming what to
install, and the export still succeeds: the mesh is what a run is for.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from threed.cameras import orbit_cameras
from threed.errors import UserError, first_line
from threed.rundir import FINAL_MESH, RunDir, stage_mesh_stem
from threed.scenes import render_each

if TYPE_CHECKING:
    from threed.trainer import Trainer

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
    """Write an optional artifact; if that fails, one warning line and the export goes on (a missing MP4
    encoder must not turn a finished run into a failed one)."""
    try:
        written.append(write())
    except Exception as e:  # any failure of an optional file; Ctrl-C still stops the export
        warn(f"{name} not written: {_why_not_written(e)}; the mesh and other files are written")


def export_stage(run_dir: Path | str, trainer: Trainer, stage: str | None = None, stem: str = FINAL_MESH,
                 formats: tuple[str, ...] | None = None, resolution: int | None = None,
                 threshold: float | None = None, texture: bool | None = None, texture_size: int | None = None,
                 video: bool | None = None, progress: bool | None = None) -> list[Path]:
    """Write <stem>.<fmt> for each format (default export.formats) with their mesh.json entries (which
    record `stage` when given), and turntable.mp4 and preview.png as export.video says (`video` forces both
    on or off). With `texture` (default export.texture) OBJ and GLB carry a baked albedo texture
    (threed/texture.py); PLY keeps vertex colours. Each step shows a progress bar (`progress`: True, False,
    or None for only when stderr is a terminal). Returns every file written."""
    from exporters import UnknownFormatError, check_formats, export_mesh
    import exporters.video as video_writer

    run = RunDir(run_dir)
    cfg = trainer.cfg
    try:
        formats = tuple(check_formats(formats or cfg.export.formats))  # before minutes of extraction
    except UnknownFormatError as e:
        raise UserError(f"{e} (--format or export.formats)") from None
    trainer.scene.eval()
    exported = trainer.scene.export_mesh(resolution, threshold, progress)
    mesh = exported.mesh
    about = {**({"stage": stage} if stage else {}), **exported.about,
             "decimate_faces": int(cfg.export.decimate_faces), "step": int(trainer.step)}
    bake = cfg.export.texture if texture is None else texture
    textured = [f for f in formats if f in ("obj", "glb")] if bake else []
    plain = [f for f in formats if f not in textured]
    written = (export_mesh(run.path, plain, mesh.vertices, mesh.faces, mesh.colors, mesh.normals, stem=stem)
               if plain else [])
    meshes = {p.name: {"format": p.suffix[1:], "bytes": p.stat().st_size, "vertices": int(len(mesh.vertices)),
                       "faces": int(len(mesh.faces)), **about}
              for p in written if p.suffix[1:] in plain}
    if textured:
        from threed.texture import export_textured

        size = texture_size or cfg.export.texture_size
        timings: dict[str, float] = {}
        files = export_textured(mesh.vertices, mesh.faces, exported.albedo, run.path, textured, size,
                                cfg.export.texture_max_faces, trainer.device,
                                sys.stderr.isatty() if progress is None else progress, name=stem,
                                inset=exported.inset, timings=timings, material_fn=exported.material)
        written += files
        for p in files:
            if p.suffix[1:] in textured:
                meshes[p.name] = {"format": p.suffix[1:], "bytes": p.stat().st_size, "texture_size": int(size),
                                  "faces_before_decimation": int(len(mesh.faces)),
                                  "decimated_to_at_most": int(cfg.export.texture_max_faces), **about,
                                  "texture_time_s": {k: round(v, 3) for k, v in timings.items()}}
    written.append(run.write_mesh_entries(meshes))
    own_files = getattr(trainer.scene, "export_files", None)
    if own_files is not None:  # what a scene writes of its own kind (the Gaussians' 3DGS .ply)
        written += own_files(run.path)

    if cfg.export.video if video is None else video:
        def turntable() -> Path:
            video_writer.require_mp4_writer()  # before rendering frames that could not be written
            size = cfg.export.video_resolution
            cams = orbit_cameras(cfg.camera, cfg.export.video_frames, size, size)
            frames, _ = render_each(trainer.scene, cams, "albedo", trainer.device, progress, "turntable frames")
            return video_writer.write_video(list(frames), run.path / "turntable.mp4", cfg.export.video_fps,
                                            progress=progress)

        _write_optional("turntable.mp4", turntable, written)
    n = cfg.export.preview_views if video is None or video else 0
    if n > 0:
        def preview() -> Path:
            side = max(16, min(256, cfg.export.video_resolution))
            cams = orbit_cameras(cfg.camera, n, side, side)
            colour, _ = render_each(trainer.scene, cams, "albedo", trainer.device, progress, "preview: colour")
            plain, _ = render_each(trainer.scene, cams, "textureless", trainer.device, progress,
                                   "preview: textureless")
            # image-to-3D: a first row with the input image beside the render from the reference camera
            pair = getattr(trainer.scene, "reference_pair", None)
            first = list(pair(side)) if pair is not None else []
            cols = max(n, len(first))
            first += [np.zeros_like(first[0])] * (cols - len(first)) if first else []
            return video_writer.write_image_grid(first + list(colour) + list(plain), run.path / "preview.png",
                                                 cols=cols)

        _write_optional("preview.png", preview, written)
    return written


def kept_mesh_entry(run_dir: Path | str, stage: str, step: int) -> dict | None:
    """mesh.json's entry of the mesh kept from `stage` (mesh-<stage>.*) when exported at `step`, if any."""
    stem = stage_mesh_stem(stage) + "."
    for name, entry in RunDir(run_dir).mesh_entries().items():
        if name.startswith(stem) and isinstance(entry, dict) and entry.get("step") == step:
            return entry
    return None
