"""`threed bench`: bad input, the plan (one run specification with `threed run`), bookkeeping (resume,
failures, reference scores), an end-to-end run with tiny random Stable Diffusion and CLIP models, child
processes (per-run peak memory, crashes) and Ray."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_clip import write_tiny_clip  # noqa: E402  (tests/ is on sys.path, see conftest.py)
from threed import methods, pipeline, spec  # noqa: E402
from threed.bench import child as bench_child  # noqa: E402
from threed.bench import plan as bench_plan  # noqa: E402
from threed.bench.evaluate import Evaluator  # noqa: E402
from threed.cli import main as cli  # noqa: E402
from threed.cli import parser  # noqa: E402
from threed.config import DEFAULT_SD_MODEL, load_yaml, to_dict  # noqa: E402
from threed.errors import UserError  # noqa: E402
from threed.rundir import RunDir  # noqa: E402

# Small enough for a few seconds per run on a shared 2-core CPU (measured: 2-12 s per run). A fixed density
# level skips the automatic level search (3 s of CPU per run; it chose 1.07 for these runs). The keys of a
# prior's section go only to the methods using that prior (an error if no method does).
TINY_RUN = ["render.width=16", "render.height=16", "render.num_samples=16", "render.occupancy_resolution=16",
            "render.shading=albedo", "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64",
            "field.hidden_dim=16", "loss.orient=0", "export.resolution=16", "export.threshold=1.0",
            "export.video=false", "export.preview_views=1", "export.video_resolution=16"]
TINY_SD = ["guidance.sd.resolution=64"]
TINY_CLIP = ["guidance.clip.resolution=32", "guidance.clip.num_augs=1"]
FAULTS = Path(__file__).resolve().parent / "fault_injection"  # its sitecustomize.py makes chosen children die


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One PyTorch thread here and in the entries' child processes: these models are so small that a second
    thread only adds synchronisation, and on a busy shared 2-core machine it made tiny CLIP steps 1 it/s
    instead of 26 it/s (measured). The thread count does not change what these tests check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-bench-clip.json")


def write_prompts(path: Path, *prompts: str) -> str:
    path.write_text("# benchmark prompts\n\n" + "\n".join(prompts) + "\n")
    return str(path)


def bench_args(prompts: str, out: Path, methods: str, *extra: str) -> list[str]:
    return ["bench", "--prompts", prompts, "--methods", methods, "--steps", "2", "--out", str(out), "--quiet",
            "--device", "cpu", *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("threed: error:")]
    assert len(lines) == 1, err
    return lines[0]


def plan_of(argv: list[str]) -> list[bench_plan.Entry]:
    """The entries `threed bench ARGV` would train (configs resolved, nothing run)."""
    return bench_plan.make_plan(parser().parse_args(argv), cuda=False)[0]


def by_label(plan: list[bench_plan.Entry]) -> dict[str, list[bench_plan.Entry]]:
    out: dict[str, list[bench_plan.Entry]] = {}
    for e in plan:
        out.setdefault(e.label, []).append(e)
    return out


def rows_of(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "results.csv")))


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing", "prompts file .* not found"),
    ("empty", "has no prompts"),
    ("duplicate", "appears twice"),
    ("method", "unknown method 'nerf' in --methods"),
    ("oracle-method", r"'oracle' in --methods is a prior, not a method: pass --methods dreamfusion --guidance oracle"),
    ("seeds", "bad --seeds"),
    ("steps", "--steps must be at least 1"),
    ("reference", "reference mesh .* not found"),
    ("unused-option", "--model concerns the stable_diffusion prior, which no method of this bench uses"),
    ("unused-key", "guidance.sd.guidance_scale=50 concerns the stable_diffusion prior, which no method"),
    ("unused-prior", "--guidance oracle: no method of this bench takes the oracle prior"),
    ("override-method", "the override dreamfusion:render.width=8 is for method dreamfusion, which is not in --methods"),
    ("preset-method", "--preset sds=cpu-tiny is for method dreamfusion, which is not in --methods"),
    ("preset-conflict", "preset cpu-tiny is for method dreamfusion, not clip: pass --preset METHOD=PRESET"),
    ("plain-prior", "guidance.type=clip would set one prior for every method: pass --guidance clip"),
    ("method-prior", "method clip takes the clip prior, not oracle"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, tmp_path, capsys, tiny_clip):
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    argv = bench_args(prompts, tmp_path / "out", "clip", "--eval-clip-model", tiny_clip,
                      "--eval-clip-pretrained", "none")
    extra = {"seeds": ["--seeds", "0,x"], "reference": ["--reference", str(tmp_path / "nope.obj")],
             "unused-option": ["--model", "some/model"], "unused-key": ["guidance.sd.guidance_scale=50"],
             "unused-prior": ["--guidance", "oracle"], "override-method": ["dreamfusion:render.width=8"],
             "preset-method": ["--preset", "sds=cpu-tiny"], "preset-conflict": ["--preset", "cpu-tiny"],
             "plain-prior": ["guidance.type=clip"], "method-prior": ["clip:guidance.type=oracle"]}
    argv += extra.get(case, [])
    if case == "missing":
        argv[argv.index("--prompts") + 1] = str(tmp_path / "nope.txt")
    elif case == "empty":
        argv[argv.index("--prompts") + 1] = write_prompts(tmp_path / "e.txt")
    elif case == "duplicate":
        argv[argv.index("--prompts") + 1] = write_prompts(tmp_path / "d.txt", "a cat", "a dog", "a cat")
    elif case == "method":
        argv[argv.index("--methods") + 1] = "clip,nerf"
    elif case == "oracle-method":
        argv[argv.index("--methods") + 1] = "oracle"
    elif case == "steps":
        argv[argv.index("--steps") + 1] = "0"
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert re.search(message, error_line(err)), error_line(err)
    assert not (tmp_path / "out" / "runs").exists()


def test_missing_clip_weights_offline_fail_before_any_training(tmp_path, capsys, monkeypatch, tiny_clip):
    """Evaluator and guidance weights are checked first, and each error names the bench's own flag (the
    evaluator's used to say --clip-pretrained, the guidance's flag). Measured: about 0.1 s after imports;
    we allow 10 s."""
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
    assert "--eval-clip-pretrained" in line and " --clip-pretrained" not in line
    # an available evaluator, but the guidance CLIP (the clip-cpu preset's ViT-B-32/openai) is missing
    rc, _, err = run_cli(bench_args(prompts, tmp_path / "out", "clip", "--eval-clip-model", tiny_clip,
                                    "--eval-clip-pretrained", "none"), capsys)
    line = error_line(err)
    assert rc == 2 and "ViT-B-32" in line and " --clip-pretrained" in line
    assert not (tmp_path / "out" / "runs").exists()


def test_the_weight_check_asks_for_the_files_and_revision_a_run_asks_for(tmp_path, monkeypatch, tiny_clip):
    """The default Stable Diffusion id is checked at its pinned revision (threed.guidance.hub), as the run
    loads it; a folder is checked without one."""
    from threed.guidance import hub

    calls = []
    monkeypatch.setattr(hub, "resolve_pretrained", lambda model, kind, **kw: calls.append((model, kw)) or model)
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    for extra in ([], ["--model", "/models/sd"]):
        plan = plan_of(bench_args(prompts, tmp_path / "out", "sds", *extra))
        bench_plan.check_weights(plan, tiny_clip, "none")
    (default, kw), (folder, kw_folder) = calls
    assert default == DEFAULT_SD_MODEL and kw["revision"] == hub.PINNED_REVISIONS[default]
    assert kw["required"] == hub.SD_SUBFOLDERS
    assert folder == "/models/sd" and kw_folder["revision"] is None


def test_slugs_are_distinct_and_readable():
    a, b = bench_plan.slugify("A red apple!"), bench_plan.slugify("a red apple")
    assert a.startswith("a-red-apple-") and b.startswith("a-red-apple-") and a != b
    long = bench_plan.slugify("x" * 200)
    assert len(long) <= 48 + 7


# -- the plan: one run specification with `threed run` ----------------------------------------------

def test_presets_per_method():
    dreamfusion, clip = methods.get("dreamfusion"), methods.get("clip")
    both = [dreamfusion, clip]
    assert bench_plan.parse_presets([], both) == {"dreamfusion": None, "clip": None}
    assert bench_plan.parse_presets(["cpu-tiny"], both) == {"dreamfusion": "cpu-tiny", "clip": "cpu-tiny"}
    # METHOD=PRESET wins over the preset for every method, in any order; aliases are the registry's
    assert bench_plan.parse_presets(["clip=clip-cpu", "mine.yaml"], both) == {"dreamfusion": "mine.yaml", "clip": "clip-cpu"}
    assert bench_plan.parse_presets(["sds=cpu-tiny"], both) == {"dreamfusion": "cpu-tiny", "clip": None}
    with pytest.raises(UserError, match="two presets for method dreamfusion"):
        bench_plan.parse_presets(["sds=cpu-tiny", "dreamfusion=oracle"], both)


def test_method_names_and_aliases_are_run_s(tmp_path):
    """Every name `threed run --method` accepts means the same method in `threed bench --methods` (the
    bench's own table used to invert the sds/dreamfusion alias), and folders use the registry's name."""
    for name in methods.names():
        assert [m.name for m in bench_plan.parse_methods(name)] == [methods.get(name).name]
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    plan = plan_of(bench_args(prompts, tmp_path / "out", "sds,dreamfusion,dreamfields"))
    assert [(e.method, e.run_dir.parent.name) for e in plan] == [("dreamfusion", "dreamfusion"), ("clip", "clip")]


def test_entries_get_the_config_threed_run_gives(tmp_path, tiny_clip):
    """Model options and overrides go through spec.resolve as for `threed run --method M`: each method
    gets the options of its prior, and the same config values as the equivalent `threed run`."""
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    plan = plan_of(bench_args(prompts, tmp_path / "out", "sds,clip", "--model", "/models/sd", "--clip-model",
                              tiny_clip, "--clip-pretrained", "none", "--negative-prompt", "blurry",
                              "render.width=24", "guidance.sd.guidance_scale=50", "guidance.clip.num_augs=3"))
    runs = {
        "dreamfusion": spec.RunOptions(method="dreamfusion", model="/models/sd", negative_prompt="blurry",
                                       overrides=["render.width=24", "guidance.sd.guidance_scale=50"]),
        "clip": spec.RunOptions(method="clip", clip_model=tiny_clip, clip_pretrained="none", negative_prompt="blurry",
                                overrides=["render.width=24", "guidance.clip.num_augs=3"]),
    }
    for e in plan:
        opts = runs[e.method]
        opts.prompt, opts.seed, opts.steps, opts.device = "a cat", 0, 2, "cpu"
        assert to_dict(e.cfg) == to_dict(spec.resolve(opts, cuda=False)[0]), e.method
    sds, clip = (e.cfg for e in plan)
    assert sds.guidance.sd.model == "/models/sd" and sds.guidance.sd.guidance_scale == 50
    assert clip.guidance.clip.models == (tiny_clip,) and clip.guidance.clip.num_augs == 3
    assert clip.guidance.sd.model != "/models/sd"  # not applied where it would be ignored


def test_a_per_method_override_reaches_only_its_method(tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    plan = by_label(plan_of(bench_args(prompts, tmp_path / "out", "sds,clip", "sds:render.width=40",
                                       "render.height=24", "clip:guidance.clip.num_augs=3")))
    assert [e.cfg.render.width for e in plan["dreamfusion"]] == [40, 40]
    assert [e.cfg.render.width for e in plan["clip"]] != [40, 40]
    assert all(e.cfg.render.height == 24 for es in plan.values() for e in es)
    assert [e.cfg.guidance.clip.num_augs for e in plan["clip"]] == [3, 3]


def test_a_prior_override_is_honoured_and_names_the_folder(tmp_path, monkeypatch):
    """`METHOD:guidance.type=...` (and --guidance) choose the prior; nothing forces it back afterwards (the
    bench used to append guidance.type after the user's overrides, silently dropping them). The reference
    path is made absolute as `threed run` makes it (the bench used to resolve symlinks, run does not)."""
    real = tmp_path / "shapes" / "cube.obj"
    real.parent.mkdir()
    trimesh.creation.box().export(real)
    (tmp_path / "link.obj").symlink_to(real)
    prompts = write_prompts(tmp_path / "p.txt", "a cube")
    monkeypatch.chdir(tmp_path)
    plan = plan_of(bench_args(prompts, tmp_path / "out", "sds,clip", "sds:guidance.type=oracle",
                              "--reference", "link.obj"))
    run_cfg, _ = spec.resolve(spec.RunOptions(guidance="oracle", reference="link.obj"), cuda=False)
    sds, clip = plan
    assert (sds.method, sds.prior, sds.label, sds.run_dir.parent.name) == \
           ("dreamfusion", "oracle", "dreamfusion-oracle", "dreamfusion-oracle")
    assert sds.cfg.guidance.type == "oracle" and clip.cfg.guidance.type == "clip"
    assert sds.cfg.guidance.oracle.reference == run_cfg.guidance.oracle.reference == str(tmp_path / "link.obj")
    # --guidance oracle: the same entries, for the methods that take the oracle prior
    again = plan_of(bench_args(prompts, tmp_path / "out", "sds,clip", "--guidance", "oracle", "--reference",
                               str(real)))
    assert [(e.label, e.cfg.guidance.type) for e in again] == [("dreamfusion-oracle", "oracle"), ("clip", "clip")]


# -- bookkeeping with a stand-in pipeline, in this process (fast) ---------------------------------

@pytest.fixture
def fake_pipeline(monkeypatch):
    """Entries run in this process (bench_child.train without a child) and pipeline.run writes a finished
    run (a unit cube mesh) without training; rendering gives noise. `calls` records each run; a prompt in
    `fail` raises like a CUDA out-of-memory error would."""
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
        # a method of several stages: the closing record's distances of its earlier stages' meshes (made up)
        earlier = ({"nerf_chamfer_l1": 0.02, "nerf_chamfer_l1_rel": 0.01, "nerf_fscore_1pct": 0.9,
                    "nerf_normal_consistency": 0.95} if cfg.method == "magic3d" and cfg.guidance.type == "oracle"
                   else {})
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": cfg.steps, "done": True, "wall_time_s": 1.5, "it_per_s": 2.0,
                                "peak_memory_mb": 100.0, "device": "cpu", **earlier}) + "\n")
        return out

    def render_views(run_dir, n_views, shading, size, device=None, trainer=None):
        seed = abs(hash((str(run_dir), shading))) % 2**32
        return np.random.default_rng(seed).integers(0, 256, (n_views, size, size, 3), dtype=np.uint8)

    monkeypatch.setattr(bench_child, "spawn", lambda argv, log_path, cwd, tick: bench_child.train(*argv))
    monkeypatch.setattr(pipeline, "run", run)
    monkeypatch.setattr(pipeline, "render_views", render_views)
    monkeypatch.setattr(pipeline, "load_trainer", lambda run_dir, device=None: None)
    return state


def fast_args(prompts, out, methods, tiny_clip, *extra):
    return bench_args(prompts, out, methods, "--eval-clip-model", tiny_clip, "--eval-clip-pretrained", "none",
                      "--eval-views", "2", "--eval-size", "32", "--clip-model", tiny_clip, "--clip-pretrained", "none",
                      *extra)


def test_a_failed_run_is_retried_once_reported_and_retried_on_rerun(tmp_path, capsys, fake_pipeline, tiny_clip):
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    out = tmp_path / "out"
    fake_pipeline["fail"] = {"a dog"}
    rc, _, err = run_cli(fast_args(prompts, out, "clip", tiny_clip), capsys)
    assert rc == 2 and "1 of 2 runs did not finish" in error_line(err)
    assert [c[2] for c in fake_pipeline["calls"]] == ["a cat", "a dog", "a dog"]  # one retry
    rows = {r["prompt"]: r for r in rows_of(out)}
    assert rows["a cat"]["status"] == "done" and rows["a dog"]["status"] == "failed"
    assert "CUDA out of memory" in rows["a dog"]["error"]
    assert rows["a cat"]["faces"] == "12" and rows["a cat"]["watertight"] == "True"
    fake_pipeline["fail"] = set()
    fake_pipeline["calls"].clear()
    rc, _, _ = run_cli(fast_args(prompts, out, "clip", tiny_clip), capsys)
    assert rc == 0
    assert [c[2] for c in fake_pipeline["calls"]] == ["a dog"]  # only the failed entry runs again
    rows = {r["prompt"]: r for r in rows_of(out)}
    assert rows["a dog"]["status"] == "done"


def test_rerun_with_other_settings_is_refused(tmp_path, capsys, fake_pipeline, tiny_clip):
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    out = tmp_path / "out"
    assert run_cli(fast_args(prompts, out, "clip", tiny_clip), capsys)[0] == 0
    argv = fast_args(prompts, out, "clip", tiny_clip)
    argv[argv.index("--steps") + 1] = "5"
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "steps: 2 -> 5" in error_line(err)
    rc, _, err = run_cli(fast_args(prompts, out, "clip", tiny_clip, "clip:render.width=20"), capsys)
    assert rc == 2 and "render.width" in error_line(err)


def test_reference_scores_only_methods_that_see_it(tmp_path, capsys, fake_pipeline, tiny_clip):
    """The oracle's cube against a reference cube scaled by 1.1: Chamfer > 0 but small; clip runs get none."""
    ref = tmp_path / "ref.obj"
    trimesh.creation.box(extents=(1.1, 1.1, 1.1)).export(ref)
    prompts = write_prompts(tmp_path / "p.txt", "a cube", "a box")
    out = tmp_path / "out"
    rc, _, _ = run_cli(fast_args(prompts, out, "sds,clip", tiny_clip, "--guidance", "oracle", "--reference",
                                 str(ref)), capsys)
    assert rc == 0
    assert {c[1] for c in fake_pipeline["calls"]} == {"oracle", "clip"}
    data = json.loads((out / "results.json").read_text())
    for row in data["runs"]:
        if row["prior"] == "oracle":
            assert row["method"] == "dreamfusion" and row["run_dir"].startswith("runs/dreamfusion-oracle/")
            assert 0.0 < row["chamfer_l1"] < 0.2 and 0.0 <= row["fscore_1pct"] <= 1.0
            assert 0.9 < row["normal_consistency"] <= 1.0  # cube against cube: faces parallel but near edges
        else:
            assert "chamfer_l1" not in row and "normal_consistency" not in row
    oracle = next(s for s in data["summary"] if s["prior"] == "oracle")
    assert "mean_chamfer_l1" in oracle and "mean_normal_consistency" in oracle
    report = (out / "report.md").read_text()
    assert "Chamfer-L1" in report and "| dreamfusion-oracle |" in report
    assert "| normal consistency |" in report and "normal_consistency" in (out / "results.csv").read_text()


def test_reference_rows_carry_each_earlier_stages_distances(tmp_path, capsys, fake_pipeline, tiny_clip):
    """Magic3D under the oracle with --reference: its row holds the bench's distances of the final mesh and,
    from the run's closing record, those of its NeRF stage's mesh (nerf_*); DreamFusion's, one stage, none."""
    ref = tmp_path / "ref.obj"
    trimesh.creation.box(extents=(1.1, 1.1, 1.1)).export(ref)
    prompts = write_prompts(tmp_path / "p.txt", "a cube")
    out = tmp_path / "out"
    rc, _, err = run_cli(bench_args(prompts, out, "sds,magic3d", "--eval-clip-model", tiny_clip,
                                    "--eval-clip-pretrained", "none", "--eval-views", "2", "--eval-size", "32",
                                    "--guidance", "oracle", "--reference", str(ref), "magic3d:mesh.steps=2"), capsys)
    assert rc == 0, err
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert rows["magic3d"]["nerf_chamfer_l1_rel"] == 0.01 and rows["magic3d"]["nerf_normal_consistency"] == 0.95
    assert 0.9 < rows["magic3d"]["normal_consistency"] <= 1.0
    assert not any(k.startswith("nerf_") for k in rows["dreamfusion"])
    assert "nerf_normal_consistency" in (out / "results.csv").read_text().splitlines()[0]


def test_progress_of_training_and_evaluation_is_shown(tmp_path, capsys, fake_pipeline, tiny_clip):
    """Without --quiet: the bench's bar (steps, entries done / running / failed) and the evaluation's bar
    (rendered views, naming the entry and stage); the evaluation used to print one line and sit silent."""
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    argv = [a for a in fast_args(prompts, tmp_path / "out", "clip", tiny_clip) if a != "--quiet"]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0
    assert "entries: 2 done, 0 running, 0 failed, 2 in all" in err and "4/4 [" in err  # 2 entries x 2 steps
    assert re.search(r"evaluating: 100%.*8/8 .*view", err) and "clip/a-dog" in err
    assert "bench: evaluating 2 runs (2 views x 2 shadings" in err + stdout


def test_a_ray_task_that_cannot_see_the_bench_folder_says_so_and_a_crash_survives_pickling(tmp_path):
    """A node without the shared --out folder fails its entry with the fix; a crashed entry's status travels
    inside the exception Ray pickles back to the bench."""
    import pickle

    from threed.bench import ray as bench_ray

    (tmp_path / bench_ray.TOKEN_FILE).write_text("this bench's token")
    status = bench_ray.run_task({}, str(tmp_path / bench_ray.TOKEN_FILE), "another bench's token")
    assert status["status"] == "failed" and "every Ray node mounts at the same path" in status["error"]
    crash = pickle.loads(pickle.dumps(bench_ray.EntryCrashed({"status": "failed", "error": "crashed: killed"})))
    assert crash.status == {"status": "failed", "error": "crashed: killed"} and str(crash) == "crashed: killed"


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


E4 = np.eye(4, dtype=np.float32)  # the evaluator's text embedding of prompt p is e_p
SCORED_PROMPTS = ["a red apple", "a blue chair", "a green frog", "a wooden boat"]
# Two views' embeddings per (bench method, true prompt, shading); the comments give each result's cosine
# to prompts 0..3 averaged over its views, its 0-based rank (a tie counts against the result) and cosine.
DESIGNED = {
    ("clip", 0, "albedo"): [E4[0], E4[0]],                              # 1, 0, 0, 0: rank 0, cos 1
    ("clip", 1, "albedo"): [E4[2], _unit([0, 0.6, 0.8, 0])],            # 0, .3, .9, 0: rank 1, cos .3
    ("clip", 2, "albedo"): [E4[0], E4[3]],                              # .5, 0, 0, .5: rank 3 (p1 ties), cos 0
    ("clip", 3, "albedo"): [_unit([0.6, 0, 0, 0.8]), _unit([0.8, 0, 0, 0.6])],  # .7, 0, 0, .7: rank 1 (tie)
    ("oracle", 0, "albedo"): [E4[0], E4[0]],                            # hit
    ("oracle", 1, "albedo"): [E4[1], _unit([0, 1, 0.5, 0])],            # hit, cos (1 + .894) / 2 = .9472
    ("oracle", 2, "albedo"): [E4[2], E4[2]],                            # hit
    ("oracle", 3, "albedo"): [_unit([0.6, 0, 0.7, 0.4])] * 2,           # .597, 0, .697, .398: rank 2
}
for _p in range(4):
    DESIGNED[("clip", _p, "textureless")] = [E4[_p], E4[_p]]            # every result a hit
    DESIGNED[("oracle", _p, "textureless")] = [E4[0], E4[0]]            # all look like prompt 0: ranks 0, 3, 3, 3


def test_ranks_and_r_precision_from_known_embeddings(tmp_path, capsys, fake_pipeline, tiny_clip, monkeypatch):
    """4 prompts x 2 methods with hand-built view embeddings: every rank, cosine and R@1 is known exactly.

    With 4 prompts a rank pattern like [0, 1, 3, 1] or R@1 values 0.25 / 1.0 / 0.75 / 0.25 split by shading
    do not come out of a mix-up of prompts, shadings or methods (the tests these replace accepted any
    rank in {0, 1} and any R@1 in {0, 0.5, 1} with 2 prompts)."""
    import yaml

    codes: list[np.ndarray] = []  # renders carry an index into this list in their pixels

    def render_views(run_dir, n_views, shading, size, device=None, trainer=None):
        prompt = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["prompt"]
        method = {"dreamfusion-oracle": "oracle"}.get(Path(run_dir).parent.name, Path(run_dir).parent.name)
        views = DESIGNED[(method, SCORED_PROMPTS.index(prompt), shading)]
        assert n_views == len(views)
        images = np.zeros((n_views, size, size, 3), np.uint8)
        for v, emb in enumerate(views):
            images[v] = len(codes)
            codes.append(emb)
        return images

    monkeypatch.setattr(pipeline, "render_views", render_views)
    monkeypatch.setattr(Evaluator, "images",
                        lambda self, images: np.stack([codes[im[0, 0, 0]] for im in images]))
    monkeypatch.setattr(Evaluator, "texts", lambda self, texts: E4[[SCORED_PROMPTS.index(t) for t in texts]])
    ref = tmp_path / "ref.obj"
    trimesh.creation.box().export(ref)
    prompts = write_prompts(tmp_path / "p.txt", *SCORED_PROMPTS)
    out = tmp_path / "out"
    rc, _, err = run_cli(fast_args(prompts, out, "clip,dreamfusion", tiny_clip, "--guidance", "oracle",
                                   "--reference", str(ref)), capsys)
    assert rc == 0, err

    def name(r: dict) -> str:  # the oracle entries are dreamfusion's, in runs/dreamfusion-oracle/
        return "oracle" if r["prior"] == "oracle" else r["method"]

    rows = {(name(r), r["prompt"]): r for r in csv.DictReader(open(out / "results.csv"))}
    expected = {  # (method, prompt): (rank colour, cosine colour, rank textureless)
        ("clip", 0): (0, 1.0, 0), ("clip", 1): (1, 0.3, 0), ("clip", 2): (3, 0.0, 0), ("clip", 3): (1, 0.7, 0),
        ("oracle", 0): (0, 1.0, 0), ("oracle", 1): (0, 0.9472, 3), ("oracle", 2): (0, 1.0, 3),
        ("oracle", 3): (2, 0.398, 3),
    }
    for (method, p), (rank, cos, rank_plain) in expected.items():
        row = rows[(method, SCORED_PROMPTS[p])]
        assert (int(row["rank_color"]), int(row["rank_textureless"])) == (rank, rank_plain), (method, p)
        assert float(row["clip_sim_color"]) == pytest.approx(cos, abs=1e-4), (method, p)
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"]["chance"] == 0.25
    summary = {name(s): s for s in data["summary"]}
    assert (summary["clip"]["r_at_1_color"], summary["clip"]["r_at_1_textureless"]) == (0.25, 1.0)
    assert (summary["oracle"]["r_at_1_color"], summary["oracle"]["r_at_1_textureless"]) == (0.75, 0.25)
    assert summary["clip"]["mean_clip_sim_color"] == pytest.approx((1.0 + 0.3 + 0.0 + 0.7) / 4, abs=1e-4)
    assert summary["clip"]["inflated"] is True and summary["oracle"]["inflated"] is False
    assert all(s["finished"] == 4 for s in summary.values())


# -- end to end with tiny random models -----------------------------------------------------------

def e2e_argv(prompts: str, out: Path, tiny_clip: str, methods: str = "sds,clip", *extra: str) -> list[str]:
    return bench_args(prompts, out, methods, "--clip-model", tiny_clip, "--clip-pretrained", "none",
                      "--eval-clip-model", tiny_clip, "--eval-clip-pretrained", "none", "--eval-views", "2",
                      "--eval-size", "32", *extra, *TINY_RUN, *TINY_CLIP)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_sd_dir, tiny_clip):
    """`threed bench --methods sds,clip --model TINY_SD --clip-model TINY --clip-pretrained none` on 2 prompts
    x 1 seed, 2 steps each, each entry in a child process; evaluator = the guidance CLIP (so clip is
    'inflated'). The dreamfusion runs render 96² instead of 16² (a per-method override): a bigger peak."""
    root = tmp_path_factory.mktemp("bench")
    prompts = write_prompts(root / "prompts.txt", "a red apple", "a blue chair")
    argv = e2e_argv(prompts, root / "out", tiny_clip, "sds,clip", "--model", str(tiny_sd_dir), *TINY_SD,
                    "sds:render.width=96", "sds:render.height=96")
    start = time.perf_counter()
    rc = cli(argv)
    return {"rc": rc, "out": root / "out", "argv": argv, "seconds": time.perf_counter() - start,
            "prompts": prompts, "tiny_clip": tiny_clip}


@pytest.mark.slow
def test_bench_end_to_end_writes_every_output(e2e):
    out = e2e["out"]
    assert e2e["rc"] == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {(r["method"], r["prompt"]) for r in rows} == {
        (m, p) for m in ("dreamfusion", "clip") for p in ("a red apple", "a blue chair")}
    # The evaluator is the tiny random CLIP (seeded): its text embeddings recompute each row's cosine and
    # rank from the stored view embeddings, so a swapped prompt, shading or method would show.
    from threed.r_precision import prompt_ranks, prompt_similarity

    prompts = ["a red apple", "a blue chair"]
    text = torch.from_numpy(Evaluator(e2e["tiny_clip"], "none", "cpu").texts(prompts))
    for r in rows:
        assert r["status"] == "done" and r["steps"] == "2"
        assert float(r["wall_time_s"]) > 0 and float(r["it_per_s"]) > 0 and float(r["peak_memory_mb"]) > 0
        run_dir = out / r["run_dir"]
        assert RunDir(run_dir).closing_record() is not None and (run_dir / "mesh.obj").exists()
        mesh = trimesh.load(run_dir / "mesh.obj", force="mesh")
        assert (int(r["faces"]), r["watertight"]) == (len(mesh.faces), str(mesh.is_watertight))
        ev = json.loads((out / "evals" / r["method"] / f"{run_dir.name}.json").read_text())
        emb = torch.tensor(ev["emb_albedo"], dtype=torch.float32)[None]
        truth = prompts.index(r["prompt"])
        assert float(r["clip_sim_color"]) == pytest.approx(float(prompt_similarity(emb, text)[0, truth]), abs=1e-4)
        assert int(r["rank_color"]) == int(prompt_ranks(emb, text, torch.tensor([truth]))[0])
        thumb = Image.open(out / r["thumbnail"])
        assert thumb.format == "PNG" and thumb.size == (2 * 96, 2 * 96)  # 2 views x (colour, textureless)
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"]["prompts"] == ["a red apple", "a blue chair"] and data["benchmark"]["chance"] == 0.5
    summary = {s["method"]: s for s in data["summary"]}
    assert summary["clip"]["inflated"] is True and summary["dreamfusion"]["inflated"] is False
    for method, s in summary.items():
        assert s["finished"] == 2
        for short in ("color", "textureless"):  # R@1 is the share of the method's rows ranked first
            ranks = [int(r[f"rank_{short}"]) for r in rows if r["method"] == method]
            assert s[f"r_at_1_{short}"] == sum(k == 0 for k in ranks) / len(ranks)
    for name in ("r_precision.png", "time.png", "quality_vs_time.png"):
        img = Image.open(out / name)
        assert img.format == "PNG" and img.size[0] > 200
    report = (out / "report.md").read_text()
    assert "| clip |" in report and "| dreamfusion |" in report and "(inflated)" in report
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
    cut_wall = RunDir(cut).closing_record()["wall_time_s"]
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
    assert RunDir(cut).closing_record() is not None and RunDir(gone).closing_record() is not None
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    # the resumed run had no step left: its time is the first segment's, summed, not the empty last one's
    row = next(r for r in rows if r["run_dir"] == str(cut.relative_to(out)))
    assert float(row["wall_time_s"]) == pytest.approx(cut_wall, abs=0.01)
    assert float(row["segment_wall_time_s"]) < float(row["wall_time_s"])


@pytest.mark.slow
def test_each_run_reports_its_own_peak_memory_and_settings(e2e):
    """Each entry trains in a child process, so its peak memory is its own. Before, all trained in the
    bench's process, whose high-water mark only grows: the clip runs (trained after the dreamfusion runs,
    which render 96² here) reported at least the dreamfusion runs' peak. A child must not report its
    parent's size either (getrusage's ru_maxrss survives fork and exec: from this ~1 GB test process every
    child reported 1002 MB). Measured (VmHWM, shared 2-core CPU): dreamfusion 996-1016 MB, clip 813 MB;
    the margin comes from the bigger renders and the diffusers stack."""
    out = e2e["out"]
    rows = rows_of(out)
    peaks = {m: [float(r["peak_memory_mb"]) for r in rows if r["method"] == m] for m in ("dreamfusion", "clip")}
    assert max(peaks["clip"]) < min(peaks["dreamfusion"]), peaks
    # the per-method override reached only its method
    widths = {r["method"]: load_yaml(out / r["run_dir"] / "config.yaml")["render"]["width"] for r in rows}
    assert widths == {"dreamfusion": 96, "clip": 16}
    # each entry's child wrote its log
    for r in rows:
        log = out / "logs" / Path(r["run_dir"]).relative_to("runs")
        assert "bench entry: training" in log.with_suffix(".log").read_text()


def fault(path: Path, prompt: str, step: int, how: str, once: Path | None = None) -> None:
    path.write_text(json.dumps({"prompt": prompt, "step": step, "how": how, "once": str(once) if once else None}))


@pytest.mark.slow
def test_a_crashing_entry_is_recorded_failed_and_the_rest_finish(tmp_path, capsys, monkeypatch, tiny_clip):
    """The child training 'a cat' is killed (SIGKILL, as the out-of-memory killer would) before its first
    step, at both tries; the bench records it as failed with the signal and finishes 'a dog'."""
    faults = tmp_path / "fault.json"
    fault(faults, "a cat", 0, "kill")
    monkeypatch.setenv("THREED_TEST_FAULTS", str(faults))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))
    prompts = write_prompts(tmp_path / "p.txt", "a cat", "a dog")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(e2e_argv(prompts, out, tiny_clip, "clip", "--eval-views", "1"), capsys)
    assert rc == 2 and "1 of 2 runs did not finish (failed" in error_line(err)
    rows = {r["prompt"]: r for r in rows_of(out)}
    assert rows["a dog"]["status"] == "done" and int(rows["a dog"]["faces"]) > 0
    assert rows["a cat"]["status"] == "failed" and "crashed: killed by SIGKILL" in rows["a cat"]["error"]
    log = out / "logs" / "clip" / f"{bench_plan.slugify('a cat')}-s0.log"
    assert log.read_text().count("bench entry: training") == 2  # tried twice
    assert "retrying" in stdout


# -- the budget: every stage's steps ---------------------------------------------------------------

TINY_MESH = ["magic3d:mesh.steps=3", "magic3d:mesh.resolution=16", "magic3d:mesh.width=16",
             "magic3d:mesh.height=16", "magic3d:export.texture=false"]


@pytest.mark.slow
def test_a_two_stage_method_s_budget_is_every_stage_s_steps(tmp_path, capsys, monkeypatch, tiny_clip):
    """dreamfusion (one stage) and magic3d (NeRF, then mesh) under the oracle prior, `--steps 2` and
    `magic3d:mesh.steps=3`: --steps is each method's first stage, as for `threed run`, and magic3d trains 3
    mesh steps on top. Each row records the steps of every stage its entry planned (budget_nerf,
    budget_mesh, budget_total) and the run reached that total; the bench's bar counts every stage's steps of
    every entry (it used to count only --steps, sitting at 100% through the mesh stage). Measured: 21-28 s
    on a shared 2-core CPU, most of it the two child processes' imports."""
    from threed.bench import progress as bench_progress

    bars: list = []

    class Bar(bench_progress.tqdm):  # the bench's bar (quiet: not drawn), kept to read its total and count
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append((kwargs.get("desc"), self))

    monkeypatch.setattr(bench_progress, "tqdm", Bar)
    ref = tmp_path / "cube.obj"
    trimesh.creation.box(extents=(0.8, 0.8, 0.8)).export(ref)
    prompts = write_prompts(tmp_path / "p.txt", "a cube")
    out = tmp_path / "out"
    argv = bench_args(prompts, out, "dreamfusion,magic3d", "--guidance", "oracle", "--reference", str(ref),
                      "--eval-clip-model", tiny_clip, "--eval-clip-pretrained", "none", "--eval-views", "1",
                      "--eval-size", "32", *TINY_RUN, *TINY_MESH)
    entries = {e.label: e for e in plan_of(argv)}
    assert {label: e.budget for label, e in entries.items()} == {
        "dreamfusion-oracle": [("nerf", 2)], "magic3d-oracle": [("nerf", 2), ("mesh", 3)]}
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err

    expected = {"dreamfusion-oracle": {"budget_nerf": 2, "budget_mesh": "", "budget_total": 2},
                "magic3d-oracle": {"budget_nerf": 2, "budget_mesh": 3, "budget_total": 5}}
    data = json.loads((out / "results.json").read_text())
    for row in data["runs"]:
        label = bench_plan.method_label(row["method"], row["prior"])
        assert {k: row[k] for k in expected[label]} == expected[label], label
        assert row["status"] == "done" and row["steps"] == row["budget_total"]  # the closing record's step
    assert data["benchmark"]["budget"] == {"dreamfusion-oracle": {"nerf": 2, "total": 2},
                                           "magic3d-oracle": {"nerf": 2, "mesh": 3, "total": 5}}
    for row in rows_of(out):
        label = bench_plan.method_label(row["method"], row["prior"])
        assert {k: row[k] for k in expected[label]} == {k: str(v) for k, v in expected[label].items()}, label
    (bar,) = [b for desc, b in bars if desc == "bench"]
    assert bar.total == 2 + (2 + 3) == sum(e.total_steps for e in entries.values())
    assert bar.n == bar.total
    report = (out / "report.md").read_text()
    assert "dreamfusion-oracle 2 steps; magic3d-oracle 5 steps (nerf 2 + mesh 3)" in report
    assert "| 5 steps (nerf 2 + mesh 3) |" in report
    page = (out / "report.html").read_text()
    assert "budget per run (all stages): dreamfusion-oracle 2 steps, magic3d-oracle 5 steps" in page
    assert "<th>budget mesh</th>" in page


# -- Ray ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster with 2 CPUs (2 workers at once), started once for these tests; its workers see
    the fault-injection hook and a fault file the tests write."""
    ray = pytest.importorskip("ray")
    faults = tmp_path_factory.mktemp("faults") / "fault.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THREED_TEST_FAULTS", str(faults))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 log_to_driver=False)
    yield {"faults": faults}
    ray.shutdown()


DETERMINISTIC = ("method", "prior", "prompt", "seed", "status", "steps", "device", "faces", "watertight",
                 "rank_color", "rank_textureless", "run_dir", "thumbnail", "error")


@pytest.mark.slow
def test_ray_bench_gives_the_serial_rows_retries_a_killed_worker_and_skips_finished(e2e, ray_cluster, tmp_path,
                                                                                      capsys):
    """The clip half of the serial end-to-end bench, as Ray tasks on 2 workers. The child training
    'a blue chair' dies (os._exit) after its first step on its first try: Ray retries it, it resumes from
    the step-1 checkpoint and finishes. The rows equal the serial bench's clip rows; a re-run skips all."""
    marker = tmp_path / "crashed-once"
    fault(ray_cluster["faults"], "a blue chair", 1, "exit", once=marker)
    out = tmp_path / "out"
    argv = e2e_argv(e2e["prompts"], out, e2e["tiny_clip"], "clip", "--ray", "local", "checkpoint_every=1")
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert marker.exists()  # the fault fired
    retried = out / "runs" / "clip" / f"{bench_plan.slugify('a blue chair')}-s0"
    log = (out / "logs" / "clip" / f"{retried.name}.log").read_text()
    assert log.count("bench entry: training") == 1 and log.count("bench entry: resuming") == 1
    ray_rows = rows_of(out)
    serial_rows = [r for r in rows_of(e2e["out"]) if r["method"] == "clip"]
    assert [{k: r.get(k) for k in DETERMINISTIC} for r in ray_rows] == \
           [{k: r.get(k) for k in DETERMINISTIC} for r in serial_rows]
    for a, b in zip(ray_rows, serial_rows):
        assert float(a["clip_sim_color"]) == pytest.approx(float(b["clip_sim_color"]), abs=1e-3)
    for a, b in zip(ray_rows, serial_rows):  # the same settings but checkpoint_every (for the resume)
        ray_cfg, serial_cfg = (load_yaml(root / r["run_dir"] / "config.yaml") for root, r in ((out, a), (e2e["out"], b)))
        assert ray_cfg.pop("checkpoint_every") == 1 and serial_cfg.pop("checkpoint_every") != 1
        assert ray_cfg == serial_cfg
    # a re-run starts no task: every entry is finished
    logs = {p: p.stat().st_mtime_ns for p in (out / "logs").rglob("*.log")}
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0 and stdout.count("done already, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "logs").rglob("*.log")} == logs
    # settings under which no task could start are an error, not a hang
    from threed.bench import ray as bench_ray

    with pytest.raises(UserError, match="--ray-cpus 64 is more than any node of the Ray cluster has"):
        bench_ray.connect("local").check([], None, 64)


@pytest.mark.slow
def test_ctrl_c_stops_the_entry_keeps_its_checkpoint_and_exits_130(tmp_path, capsys, monkeypatch, tiny_clip):
    """A Ctrl-C reaches the bench (here: the child sends SIGINT to this process at its step 1); the bench
    stops the child, which saves a checkpoint, and exits 130 without results; the same command resumes."""
    faults = tmp_path / "fault.json"
    fault(faults, "a cat", 1, "interrupt", once=tmp_path / "interrupted-once")
    monkeypatch.setenv("THREED_TEST_FAULTS", str(faults))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]))
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    out = tmp_path / "out"
    argv = e2e_argv(prompts, out, tiny_clip, "clip", "--steps", "3", "--eval-views", "1")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 130 and "interrupted: 0 of 1 runs are finished" in error_line(err)
    run_dir = out / "runs" / "clip" / f"{bench_plan.slugify('a cat')}-s0"
    assert RunDir(run_dir).closing_record() is None and RunDir(run_dir).has_checkpoint()
    assert not (out / "results.csv").exists()
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0 and f"resuming in {run_dir}" in stdout and RunDir(run_dir).closing_record()["step"] == 3


@pytest.mark.slow
def test_ctrl_c_during_a_ray_bench_stops_the_running_tasks_and_keeps_their_checkpoints(ray_cluster, tmp_path,
                                                                                      tiny_clip):
    """A Ctrl-C in the bench (raised here in its progress loop once the entry has trained a step) cancels
    the Ray tasks; the running one stops its child, which saves a checkpoint, and the bench re-raises."""
    from threed.bench import ray as bench_ray
    from threed.bench.train import entry_task

    fault(ray_cluster["faults"], "none of these prompts", 0, "exit")
    prompts = write_prompts(tmp_path / "p.txt", "a cat")
    out = tmp_path / "out"
    (entry,) = plan_of(e2e_argv(prompts, out, tiny_clip, "clip", "--steps", "2000"))

    class CtrlC:
        """Progress that presses Ctrl-C once the entry has logged a step."""

        def write(self, line: str) -> None:
            pass

        def finish(self, entry, status: dict) -> None:
            raise AssertionError(f"the entry ended: {status}")

        def poll(self, candidates=None) -> None:
            if RunDir(entry.run_dir).last_logged_step() >= 1:
                raise KeyboardInterrupt

    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        bench_ray.connect("local").train([entry], CtrlC(), 1, out, task=entry_task, line=lambda e, status: "")
    assert RunDir(entry.run_dir).closing_record() is None
    assert RunDir(entry.run_dir).has_checkpoint()
    assert "interrupted at step" in entry.log_path.read_text()
