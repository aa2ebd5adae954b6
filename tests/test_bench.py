"""`threed bench`: bad input, bookkeeping (resume, failures, reference scores) and an end-to-end run with
tiny random Stable Diffusion and CLIP models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_clip import write_tiny_clip  # noqa: E402  (tests/ is on sys.path, see conftest.py)
from threed import bench, pipeline  # noqa: E402
from threed.cli import main as cli  # noqa: E402

# Small enough for a few seconds per run on a shared 2-core CPU (measured: 2-12 s per run).
TINY_RUN = ["render.width=16", "render.height=16", "render.num_samples=16", "render.occupancy_resolution=16",
            "render.shading=albedo", "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64",
            "field.hidden_dim=16", "loss.orient=0", "guidance.sd.resolution=64", "guidance.clip.resolution=32",
            "guidance.clip.num_augs=1", "export.resolution=16", "export.video=false", "export.preview_views=1",
            "export.video_resolution=16"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-bench-clip.json")


def write_prompts(path: Path, *prompts: str) -> str:
    path.write_text("# benchmark prompts\n\n" + "\n".join(prompts) + "\n")
    return str(path)


def bench_args(prompts: str, out: Path, methods: str, *extra: str) -> list[str]:
    return ["bench", "--prompts", prompts, "--methods", methods, "--steps", "2", "--out", str(out), "--quiet",
            "--device", "cpu", "--preset", "cpu-tiny", *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("threed: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing", "prompts file .* not found"),
    ("empty", "has no prompts"),
    ("duplicate", "appears twice"),
    ("method", "unknown method 'nerf'"),
    ("seeds", "bad --seeds"),
    ("steps", "--steps must be at least 1"),
    ("reference", "reference mesh .* not found"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, tmp_path, capsys, tiny_clip):
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    argv = bench_args(prompts, tmp_path / "out", "clip", "--eval-clip-model", tiny_clip,
                      "--eval-clip-pretrained", "none")
    if case == "missing":
        argv[argv.index("--prompts") + 1] = str(tmp_path / "nope.txt")
    elif case == "empty":
        argv[argv.index("--prompts") + 1] = write_prompts(tmp_path / "e.txt")
    elif case == "duplicate":
        argv[argv.index("--prompts") + 1] = write_prompts(tmp_path / "d.txt", "a cat", "a dog", "a cat")
    elif case == "method":
        argv[argv.index("--methods") + 1] = "clip,nerf"
    elif case == "seeds":
        argv += ["--seeds", "0,x"]
    elif case == "steps":
        argv[argv.index("--steps") + 1] = "0"
    elif case == "reference":
        argv += ["--reference", str(tmp_path / "nope.obj")]
    import re

    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert re.search(message, error_line(err))
    assert not (tmp_path / "out" / "runs").exists()


def test_missing_clip_weights_offline_fail_before_any_training(tmp_path, capsys, monkeypatch, tiny_clip):
    """Evaluator and guidance weights are checked first. Measured: about 0.1 s after imports; we allow 10 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    import threed.clip_models  # noqa: F401  (imports outside the timed part)

    start = time.perf_counter()
    rc, _, err = run_cli(bench_args(prompts, tmp_path / "out", "clip"), capsys)  # default evaluator ViT-B-16/openai
    assert rc == 2 and time.perf_counter() - start < 10.0
    line = error_line(err)
    assert "ViT-B-16" in line and "hf download" in line
    # an available evaluator, but the guidance CLIP (the clip preset's ViT-B-32/openai) is missing
    rc, _, err = run_cli(bench_args(prompts, tmp_path / "out", "clip", "--eval-clip-model", tiny_clip,
                                    "--eval-clip-pretrained", "none"), capsys)
    assert rc == 2 and "ViT-B-32" in error_line(err)
    assert not (tmp_path / "out" / "runs").exists()


def test_slugs_are_distinct_and_readable():
    a, b = bench.slugify("A red apple!"), bench.slugify("a red apple")
    assert a.startswith("a-red-apple-") and b.startswith("a-red-apple-") and a != b
    long = bench.slugify("x" * 200)
    assert len(long) <= 48 + 7


def test_presets_per_method():
    assert bench.parse_presets([], ["sds", "clip"]) == {"sds": "dreamfusion-sd", "clip": "clip"}
    assert bench.parse_presets(["cpu-tiny"], ["sds", "clip"]) == {"sds": "cpu-tiny", "clip": "cpu-tiny"}
    assert bench.parse_presets(["cpu-tiny", "clip=clip"], ["sds", "clip"]) == {"sds": "cpu-tiny", "clip": "clip"}


# -- bookkeeping with a stand-in pipeline (fast) --------------------------------------------------

@pytest.fixture
def fake_pipeline(monkeypatch):
    """pipeline.run writes a finished run (a unit cube mesh) without training; rendering gives noise.
    `calls` records each run; a prompt in `fail` raises like a CUDA out-of-memory error would."""
    state = {"calls": [], "fail": set()}

    def run(cfg, out, resume=False, progress=True):
        state["calls"].append((cfg.method, cfg.guidance.type, cfg.prompt, cfg.seed, resume))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        from threed.config import save_config

        save_config(cfg, out / "config.yaml")
        if cfg.prompt in state["fail"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        trimesh.creation.box().export(out / "mesh.obj")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": cfg.steps, "done": True, "wall_time_s": 1.5, "it_per_s": 2.0,
                                "peak_memory_mb": 100.0, "device": "cpu"}) + "\n")
        return out

    def render_views(run_dir, n_views, shading, size, device=None, trainer=None):
        seed = abs(hash((str(run_dir), shading))) % 2**32
        return np.random.default_rng(seed).integers(0, 256, (n_views, size, size, 3), dtype=np.uint8)

    monkeypatch.setattr(pipeline, "run", run)
    monkeypatch.setattr(pipeline, "render_views", render_views)
    monkeypatch.setattr(pipeline, "load_trainer", lambda run_dir, device=None: None)
    return state


def fast_args(prompts, out, methods, tiny_clip, *extra):
    return bench_args(prompts, out, methods, "--eval-clip-model", tiny_clip, "--eval-clip-pretrained", "none",
                      "--eval-views", "2", "--eval-size", "32", f"guidance.clip.models=[{tiny_clip}]",
                      "guidance.clip.pretrained=[none]", *extra)


def test_a_failed_run_is_reported_and_retried(tmp_path, capsys, fake_pipeline, tiny_clip):
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    out = tmp_path / "out"
    fake_pipeline["fail"] = {"a dog"}
    rc, _, err = run_cli(fast_args(prompts, out, "clip", tiny_clip), capsys)
    assert rc == 2 and "1 of 2 runs did not finish" in error_line(err)
    rows = {r["prompt"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["a cat"]["status"] == "done" and rows["a dog"]["status"] == "failed"
    assert "CUDA out of memory" in rows["a dog"]["error"]
    assert rows["a cat"]["faces"] == "12" and rows["a cat"]["watertight"] == "True"
    fake_pipeline["fail"] = set()
    fake_pipeline["calls"].clear()
    rc, _, _ = run_cli(fast_args(prompts, out, "clip", tiny_clip), capsys)
    assert rc == 0
    assert [c[2] for c in fake_pipeline["calls"]] == ["a dog"]  # only the failed entry runs again
    rows = {r["prompt"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["a dog"]["status"] == "done"


def test_rerun_with_other_settings_is_refused(tmp_path, capsys, fake_pipeline, tiny_clip):
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    out = tmp_path / "out"
    assert run_cli(fast_args(prompts, out, "clip", tiny_clip), capsys)[0] == 0
    argv = fast_args(prompts, out, "clip", tiny_clip)
    argv[argv.index("--steps") + 1] = "5"
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "steps: 2 -> 5" in error_line(err)


def test_reference_scores_only_methods_that_see_it(tmp_path, capsys, fake_pipeline, tiny_clip):
    """The oracle's cube against a reference cube scaled by 1.1: Chamfer > 0 but small; clip runs get none."""
    ref = tmp_path / "ref.obj"
    trimesh.creation.box(extents=(1.1, 1.1, 1.1)).export(ref)
    prompts = write_prompts(tmp_path / "p.txt", "a cube", "a box")
    out = tmp_path / "out"
    rc, _, _ = run_cli(fast_args(prompts, out, "oracle,clip", tiny_clip, "--reference", str(ref)), capsys)
    assert rc == 0
    assert {c[1] for c in fake_pipeline["calls"]} == {"oracle", "clip"}
    data = json.loads((out / "results.json").read_text())
    for row in data["runs"]:
        if row["method"] == "oracle":
            assert 0.0 < row["chamfer_l1"] < 0.2 and 0.0 <= row["fscore_1pct"] <= 1.0
        else:
            assert "chamfer_l1" not in row
    oracle = next(s for s in data["summary"] if s["method"] == "oracle")
    assert "mean_chamfer_l1" in oracle
    assert "Chamfer-L1" in (out / "report.md").read_text()


# -- end to end with tiny random models -----------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_sd_dir, tiny_clip):
    """sds + clip on 2 prompts x 1 seed, 2 steps each; evaluator = the guidance CLIP (so clip is 'inflated')."""
    root = tmp_path_factory.mktemp("bench")
    prompts = write_prompts(root / "prompts.txt", "a red apple", "a blue chair")
    argv = bench_args(prompts, root / "out", "sds,clip", "--eval-clip-model", tiny_clip, "--eval-clip-pretrained",
                      "none", "--eval-views", "2", "--eval-size", "32", f"guidance.sd.model={tiny_sd_dir}",
                      f"guidance.clip.models=[{tiny_clip}]", "guidance.clip.pretrained=[none]", *TINY_RUN)
    start = time.perf_counter()
    rc = cli(argv)
    return {"rc": rc, "out": root / "out", "argv": argv, "seconds": time.perf_counter() - start}


@pytest.mark.slow
def test_bench_end_to_end_writes_every_output(e2e):
    out = e2e["out"]
    assert e2e["rc"] == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {(r["method"], r["prompt"]) for r in rows} == {
        (m, p) for m in ("sds", "clip") for p in ("a red apple", "a blue chair")}
    for r in rows:
        assert r["status"] == "done" and r["steps"] == "2"
        assert float(r["wall_time_s"]) > 0 and float(r["it_per_s"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert int(r["faces"]) >= 0 and r["watertight"] in ("True", "False")
        assert -1.0 <= float(r["clip_sim_color"]) <= 1.0 and r["rank_color"] in ("0", "1")
        run_dir = out / r["run_dir"]
        assert bench.final_record(run_dir) is not None and (run_dir / "mesh.obj").exists()
        thumb = Image.open(out / r["thumbnail"])
        assert thumb.format == "PNG" and thumb.size == (2 * 96, 2 * 96)  # 2 views x (colour, textureless)
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"]["prompts"] == ["a red apple", "a blue chair"] and data["benchmark"]["chance"] == 0.5
    summary = {s["method"]: s for s in data["summary"]}
    assert summary["clip"]["inflated"] is True and summary["sds"]["inflated"] is False
    for s in summary.values():
        assert s["finished"] == 2
        assert s["r_at_1_color"] in (0.0, 0.5, 1.0) and s["r_at_1_textureless"] in (0.0, 0.5, 1.0)
    for name in ("r_precision.png", "time.png", "quality_vs_time.png"):
        img = Image.open(out / name)
        assert img.format == "PNG" and img.size[0] > 200
    report = (out / "report.md").read_text()
    assert "| clip |" in report and "| sds |" in report and "(inflated)" in report
    for link in [ln.split("](")[1].split(")")[0] for ln in report.splitlines() if "](" in ln]:
        for part in link.split(")"):
            if part.endswith(".png"):
                assert (out / part).exists(), part
    assert len(list((out / "evals").rglob("*.json"))) == 4
    page = (out / "report.html").read_text()
    for r in rows:
        assert f'src="{r["run_dir"]}/report.html#viewer"' in page and (out / r["run_dir"] / "report.html").is_file()


@pytest.mark.slow
def test_bench_resumes_after_an_interruption(e2e, tmp_path, capsys):
    """Copy the finished benchmark, undo one run's "done" record and delete another run: re-running the
    same command redoes exactly those two and re-evaluates only them."""
    out = tmp_path / "out"
    shutil.copytree(e2e["out"], out)
    runs = sorted(p for p in (out / "runs").glob("*/*") if p.is_dir())
    cut, gone = runs[0], runs[1]
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(ln for ln in lines if '"done"' not in ln) + "\n")
    shutil.rmtree(gone)
    kept = {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in runs[2:]}
    redone = {(cut.parent.name, cut.name), (gone.parent.name, gone.name)}
    evals_kept = {p: p.stat().st_mtime_ns for p in (out / "evals").rglob("*.json") if (p.parent.name, p.stem) not in redone}
    assert len(evals_kept) == 2
    argv = list(e2e["argv"])
    argv[argv.index("--out") + 1] = str(out)
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0
    assert stdout.count("done already, skipped") == 2
    assert f"resuming in {cut}" in stdout and f"training in {gone}" in stdout
    for p, mtime in kept.items():
        assert (p / "metrics.jsonl").stat().st_mtime_ns == mtime
    for p, mtime in evals_kept.items():
        assert p.stat().st_mtime_ns == mtime
    assert bench.final_record(cut) is not None and bench.final_record(gone) is not None
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
