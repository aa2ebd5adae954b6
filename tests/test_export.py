"""Exporting a run: progress for every step, optional artifacts that cannot stop an export, one metadata
entry per mesh file, the "files written" summary, and an export that needs no training."""

from __future__ import annotations

import json
import sys

import pytest
import trimesh

import exporters.video
from threed import pipeline
from threed.config import build_config
from threed.errors import UserError
from threed.trainer import Trainer

# The oracle preset's blob at a few seconds' size; no prior is needed to export a field. A given density
# level (the blob is 10 at its centre) skips the automatic level search, which only the progress test runs
# (its silhouette renders take ~10 s here).
TINY = ["device=cpu", "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64",
        "render.num_samples=24", "render.occupancy_resolution=16", "export.resolution=24", "export.threshold=5.0",
        "export.video_frames=3", "export.video_resolution=16", "export.preview_views=1", "export.formats=[obj,glb]"]


@pytest.fixture
def untrained(tmp_path):
    """A Trainer that never took a step (as after `--steps 0`): its field is the initial density blob."""
    cfg = build_config("oracle", TINY)
    return Trainer(cfg, "cpu", guidance=None, run_dir=tmp_path / "run")


def faces_in(path) -> int:
    return len(trimesh.load(path, force="mesh", process=False).faces)


def test_an_untrained_field_exports_every_file(untrained, capsys):
    run_dir = untrained.run_dir
    written = pipeline.export_run(run_dir, trainer=untrained, progress=False)
    assert [p.name for p in written] == ["mesh.obj", "mesh.mtl", "mesh.glb", "mesh.json", "turntable.mp4",
                                         "preview.png", "report.html"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([p.name for p in written] + ["report_files"])
    assert faces_in(run_dir / "mesh.obj") > 0
    meta = json.loads((run_dir / "mesh.json").read_text())["meshes"]
    assert meta["mesh.obj"]["step"] == 0 and meta["mesh.obj"]["threshold"] == 5.0
    assert capsys.readouterr().err == ""  # progress=False: not a line


def test_each_mesh_file_has_its_own_metadata(untrained):
    """Before: mesh.json held one record, overwritten by the last export, so after re-exporting a PLY at
    another resolution it described mesh.ply while mesh.obj and mesh.glb were different meshes."""
    run_dir = untrained.run_dir
    pipeline.export_run(run_dir, trainer=untrained, video=False, progress=False)
    pipeline.export_run(run_dir, ("ply",), resolution=16, threshold=3.0, trainer=untrained, video=False,
                        progress=False)
    meta = json.loads((run_dir / "mesh.json").read_text())["meshes"]
    assert sorted(meta) == ["mesh.glb", "mesh.obj", "mesh.ply"]
    for name, entry in meta.items():
        assert entry["faces"] == faces_in(run_dir / name), name
        assert entry["bytes"] == (run_dir / name).stat().st_size and entry["format"] == name[-3:]
    assert meta["mesh.obj"]["resolution"] == meta["mesh.glb"]["resolution"] == 24
    assert meta["mesh.ply"]["resolution"] == 16
    assert meta["mesh.ply"]["threshold"] == 3.0
    assert meta["mesh.obj"]["threshold"] == meta["mesh.glb"]["threshold"] == 5.0
    assert meta["mesh.obj"]["faces"] != meta["mesh.ply"]["faces"]
    # an entry whose file is gone is dropped at the next export; so is the old single-record layout
    (run_dir / "mesh.glb").unlink()
    pipeline.export_run(run_dir, ("ply",), resolution=16, trainer=untrained, video=False, progress=False)
    assert sorted(json.loads((run_dir / "mesh.json").read_text())["meshes"]) == ["mesh.obj", "mesh.ply"]
    (run_dir / "mesh.json").write_text(json.dumps({"threshold": 1.0, "vertices": 3, "faces": 1}))
    pipeline.export_run(run_dir, ("ply",), resolution=16, trainer=untrained, video=False, progress=False)
    assert sorted(json.loads((run_dir / "mesh.json").read_text())["meshes"]) == ["mesh.ply"]


@pytest.mark.parametrize("failure", ["no imageio_ffmpeg", "no ffmpeg binary", "writer error", "preview error"])
def test_an_optional_artifact_that_fails_is_one_warning(untrained, monkeypatch, capsys, failure):
    """Before: an error writing the turntable propagated, and the command failed with the mesh on disk."""
    if failure == "no imageio_ffmpeg":
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as when the package is not installed
    elif failure == "no ffmpeg binary":
        import imageio_ffmpeg

        def no_binary():
            raise RuntimeError("No ffmpeg exe could be found")

        monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_binary)
    elif failure == "writer error":
        def broken(*args, **kwargs):
            raise RuntimeError("encoder crashed\nwith a long traceback-like message")

        monkeypatch.setattr(exporters.video, "write_video", broken)
    else:
        def broken_grid(*args, **kwargs):
            raise ModuleNotFoundError("No module named 'PIL'", name="PIL")

        monkeypatch.setattr(exporters.video, "write_image_grid", broken_grid)
    run_dir = untrained.run_dir
    written = pipeline.export_run(run_dir, trainer=untrained, progress=False)
    names = [p.name for p in written]
    assert (run_dir / "mesh.obj").is_file() and "mesh.obj" in names
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threed: warning: "), lines
    if failure == "preview error":
        assert "preview.png not written" in lines[0] and "pip install pillow" in lines[0]
        assert "turntable.mp4" in names and "preview.png" not in names
    else:
        assert "turntable.mp4 not written" in lines[0] and "turntable.mp4" not in names
        assert "preview.png" in names and not (run_dir / "turntable.mp4").exists()
        if failure != "writer error":
            assert "pip install imageio-ffmpeg" in lines[0]
        else:
            assert "RuntimeError: encoder crashed" in lines[0]


def test_every_export_step_shows_progress(untrained, capsys):
    """The automatic level search's bars are tested in test_mesh.py (its renders take ~10 s here)."""
    pipeline.export_run(untrained.run_dir, trainer=untrained, progress=True)
    err = capsys.readouterr().err
    for step in ("density grid 24^3", "mesh:", "marching cubes", "turntable frames", "encoding turntable.mp4",
                 "preview: colour", "preview: textureless"):
        assert step in err, step
    assert "threed: warning" not in err


def test_unknown_format_is_a_user_error_before_extraction(untrained):
    with pytest.raises(UserError, match="unknown export format stl") as err:
        pipeline.export_run(untrained.run_dir, ("obj", "stl"), trainer=untrained, progress=False)
    assert "\n" not in str(err.value)
    assert not untrained.run_dir.exists()


def test_written_summary_lists_files_and_the_chamfer_distance(untrained, tmp_path):
    from threed.metrics import mesh_distance

    written = pipeline.export_run(untrained.run_dir, trainer=untrained, video=False, progress=False)
    text = pipeline.written_summary(written)
    lines = text.splitlines()
    assert lines[0] == f"threed: wrote 5 files in {untrained.run_dir}:"  # not the video: video=False
    assert [ln.split()[0] for ln in lines[1:]] == ["mesh.obj", "mesh.mtl", "mesh.glb", "mesh.json", "report.html"]
    assert lines[1].endswith(" kB") or lines[1].endswith(" MB")
    # the reference: the exported mesh scaled by 1.1 about the origin
    ref = trimesh.load(untrained.run_dir / "mesh.obj", force="mesh")
    ref.apply_scale(1.1)
    ref_path = tmp_path / "ref.ply"
    ref.export(ref_path)
    expected = mesh_distance(trimesh.load(untrained.run_dir / "mesh.obj", force="mesh"), ref)
    last = pipeline.written_summary(written, reference=ref_path).splitlines()[-1]
    assert last.startswith("threed: Chamfer-L1 from mesh.obj to ref.ply: ")
    assert f"{expected['chamfer_l1']:.4g}" in last and f"{expected['fscore_1pct']:.3f}" in last
    assert last.endswith(f"normal consistency: {expected['normal_consistency']:.4f}")
    assert expected["chamfer_l1"] > 0.01  # a 10% larger shape is measurably apart
    # An earlier stage's kept mesh (mesh-nerf.*, written after the final one) gets its own line.
    kept = untrained.run_dir / "mesh-nerf.ply"
    ref.apply_scale(1 / 1.1)
    ref.export(kept)
    lines = pipeline.written_summary([*written, kept], reference=ref_path).splitlines()
    assert lines[-2] == last and lines[-1].startswith("threed: Chamfer-L1 from mesh-nerf.ply to ref.ply: ")
    # A point cloud (a Gaussian run's gaussians.ply) is listed among the files but measured as no surface.
    cloud = untrained.run_dir / "gaussians.ply"
    trimesh.PointCloud(ref.vertices).export(cloud)
    lines = pipeline.written_summary([*written, cloud], reference=ref_path).splitlines()
    assert lines[-1] == last and any(ln.split()[0] == "gaussians.ply" for ln in lines[1:-1])
    with pytest.raises(UserError, match="cannot read the reference mesh"):
        pipeline.written_summary(written, reference=tmp_path / "missing.ply")


def test_exported_meshes_are_closed_manifolds_as_a_reader_loads_them(untrained):
    """OBJ, PLY and GLB of the blob, loaded the way trimesh (like Blender or MeshLab) loads a file, merging
    coincident vertices: one closed, consistently wound surface without zero-area faces, duplicate faces or
    non-manifold edges (threed.mesh.repair)."""
    from threed.mesh import mesh_defects

    pipeline.export_run(untrained.run_dir, ("obj", "ply", "glb"), trainer=untrained, video=False, progress=False)
    for name in ("mesh.obj", "mesh.ply", "mesh.glb"):
        loaded = trimesh.load(untrained.run_dir / name, force="mesh")
        assert loaded.is_watertight and loaded.is_winding_consistent and loaded.volume > 0, name
        assert len(loaded.split(only_watertight=False)) == 1, name
        defects = mesh_defects(loaded.vertices, loaded.faces)
        assert defects.pop("components") == 1 and not any(defects.values()), (name, defects)


def test_a_run_without_an_mp4_writer_exits_0_with_its_mesh_and_one_warning(tmp_path, monkeypatch, capsys):
    """`threed run` as a user runs it, on a machine where imageio-ffmpeg is not installed."""
    import shapes
    from threed.cli import main

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    reference = shapes.save(shapes.ALL["sphere"](), tmp_path / "sphere.ply")
    out = tmp_path / "run"
    code = main(["run", "--guidance", "oracle", "--reference", str(reference), "--steps", "2", "--out", str(out),
                 "--quiet", *TINY, "render.width=16", "render.height=16", "guidance.oracle.views=1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "mesh.obj").is_file() and (out / "preview.png").is_file() and not (out / "turntable.mp4").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "turntable.mp4 not written" in lines[0] and "pip install imageio-ffmpeg" in lines[0]
