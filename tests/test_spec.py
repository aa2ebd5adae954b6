"""The run specification: methods come from --method, the preset or the prior; presets from the method;
options concern one prior; resuming refuses changes. Fast: no model is loaded."""

import hashlib
from pathlib import Path

import pytest

from threed import methods, pipeline, spec
from threed.cli import main
from threed.config import build_config, save_config
from threed.errors import UserError


def resolve(cuda: bool = True, **kw):
    return spec.resolve(spec.RunOptions(**kw), cuda=cuda)


def test_preset_names_its_method():
    """`threed run --preset clip` used to be overridden to method dreamfusion and always failed."""
    cfg, notes = resolve(preset="clip", prompt="a red apple")
    assert cfg.method == "clip" and cfg.guidance.type == "clip" and notes == []


def test_method_and_prior_are_inferred():
    assert resolve(guidance="clip", prompt="x")[0].method == "clip"
    cfg, _ = resolve(method="sds", prompt="x")
    assert cfg.method == "dreamfusion" and cfg.guidance.type == "stable_diffusion"
    cfg, _ = resolve(reference="shape.ply")  # only the oracle takes a reference
    assert cfg.guidance.type == "oracle" and cfg.guidance.oracle.reference == str(Path("shape.ply").resolve())
    assert cfg.render.width == build_config("oracle").render.width  # the preset tuned for the oracle


def test_user_yaml_method_is_honoured(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: clip\nguidance:\n  type: clip\nrender:\n  width: 40\n")
    cfg, _ = resolve(preset=str(path), prompt="x")
    assert cfg.method == "clip" and cfg.render.width == 40


def test_true_conflicts_are_errors():
    with pytest.raises(UserError, match="preset clip is for method clip, not dreamfusion"):
        resolve(preset="clip", method="dreamfusion", prompt="x")
    with pytest.raises(UserError, match="method clip takes the clip prior, not oracle"):
        resolve(method="clip", guidance="oracle")
    with pytest.raises(UserError, match="--model applies to the stable_diffusion prior, but this run's prior is clip"):
        resolve(method="clip", model="some/model", prompt="x")
    with pytest.raises(UserError, match="guidance.clip.num_augs set, but this run's prior is stable_diffusion"):
        resolve(prompt="x", overrides=["guidance.clip.num_augs=2"])
    with pytest.raises(UserError, match="method=clip conflicts"):
        resolve(prompt="x", overrides=["method=clip"])


def test_cpu_preset_without_cuda_says_so():
    cfg, notes = resolve(cuda=False, prompt="x")
    assert cfg.steps == build_config("cpu-tiny").steps
    assert len(notes) == 1 and "cpu-tiny" in notes[0] and "--preset dreamfusion-sd" in notes[0]
    cfg, notes = resolve(cuda=False, prompt="x", preset="dreamfusion-sd")
    assert cfg.steps == 10000 and notes == []
    assert resolve(cuda=False, method="clip", prompt="x")[0].render.width == build_config("clip-cpu").render.width


def test_registry_is_shared_with_aliases():
    assert methods.get("sds") is methods.get("dreamfusion")
    assert set(methods.names()) >= {"dreamfusion", "sds", "clip"}
    with pytest.raises(UserError, match="unknown method 'nerf'"):
        methods.get("nerf")


# -- resume ---------------------------------------------------------------------------------------

@pytest.fixture()
def saved_run(tmp_path):
    """A run directory as `threed run` leaves it (config and a checkpoint file), without training."""
    cfg, _ = resolve(prompt="a yellow rubber duck", preset="cpu-tiny", seed=3, model="/models/sd", steps=8)
    run = tmp_path / "duck"
    save_config(cfg, run / "config.yaml")
    (run / "checkpoints" / "nerf").mkdir(parents=True)
    (run / "checkpoints" / "nerf" / "step-000008.pt").write_bytes(b"not loaded by these tests")
    return run


def fingerprint(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, named", [
    (["--prompt", "something else"], "--prompt ('a yellow rubber duck' -> 'something else')"),
    (["--model", "/models/other"], "--model"),
    (["--seed", "4"], "--seed (3 -> 4)"),
    (["optim.lr=0.5"], "optim.lr"),
    (["--guidance", "clip"], "--guidance clip differs"),
    (["--preset", "oracle"], "--preset cannot change"),
    (["--method", "clip"], "--method clip differs"),
    (["--reference", "x.ply"], "--reference applies to the oracle prior"),
])
def test_resume_refuses_changes_and_writes_nothing(saved_run, capsys, args, named):
    before = fingerprint(saved_run)
    assert main(["run", "--resume", str(saved_run), *args]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
    assert fingerprint(saved_run) == before


def test_resume_accepts_the_same_values_and_documented_keys(saved_run):
    saved = pipeline.load_run_config(saved_run)
    opts = spec.RunOptions(prompt="a yellow rubber duck", seed=3, steps=20, device="cpu",
                           overrides=["export.resolution=64", "checkpoint_every=5"])
    cfg = spec.resume_config(saved, opts)
    assert (cfg.steps, cfg.device, cfg.export.resolution, cfg.checkpoint_every) == (20, "cpu", 64, 5)


def test_resuming_a_finished_run_changes_nothing(saved_run, capsys):
    before = fingerprint(saved_run)
    assert main(["run", "--resume", str(saved_run)]) == 0
    out = capsys.readouterr().out
    assert "is finished (step 8 of 8); nothing changed" in out and "--steps" in out
    assert fingerprint(saved_run) == before
    assert main(["run", "--resume", str(saved_run), "--steps", "8"]) == 2
    assert "is not beyond the run's step 8" in capsys.readouterr().err


def test_mistyped_option_names_the_nearest(capsys):
    assert main(["run", "--stepz", "3"]) == 2
    assert "unknown option --stepz; did you mean --steps?" in capsys.readouterr().err


def test_zero_steps_is_refused(capsys):
    assert main(["run", "--prompt", "x", "--steps", "0", "--preset", "cpu-tiny"]) == 2
    assert "--steps 0" in capsys.readouterr().err
