"""threed.guidance.compile: modes, the on-disk cache, the eager fallback, and compiled guidance computing
what eager guidance computes.

On a CPU the plumbing runs with torch.compile's "aot_eager" backend (dynamo tracing + AOT autograd, no code
generation), which is what can break in the wrapper; inductor's kernels are checked on a GPU
(tests/test_cuda.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from threed.cameras import make_cameras
from threed.config import Config, GuidanceConfig, SDConfig, build_config
from threed.errors import UserError
from threed.guidance import compile as compiling
from threed.guidance.stable_diffusion import StableDiffusionGuidance


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_auto_compiles_on_cuda_only():
    assert compiling.resolve_mode("auto", "cpu", on_cuda="reduce-overhead") == "none"
    assert compiling.resolve_mode("auto", "cuda", on_cuda="reduce-overhead") == "reduce-overhead"
    assert compiling.resolve_mode("auto", "cuda:0", on_cuda="default") == "default"
    assert compiling.resolve_mode("default", "cpu", on_cuda="reduce-overhead") == "default"
    with pytest.raises(ValueError):
        compiling.resolve_mode("fast", "cpu", on_cuda="default")
    with pytest.raises(UserError, match="guidance.sd.compile.*reduce-overhead"):
        build_config("dreamfusion-sd", ["guidance.sd.compile=fast"])
    assert compiling.maybe_compile(len, "none", "len") is len


def test_cache_goes_under_threed_cache_unless_set(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("THREED_CACHE", str(tmp_path / "threed"))
    assert compiling.setup_cache() == tmp_path / "threed" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "threed" / "inductor")
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    # Inductor puts its own default in the environment when it first looks for its cache (seen on an H100:
    # the compile went to /tmp/torchinductor_root); that is not a choice of the user's.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compiling.setup_cache() == tmp_path / "threed" / "inductor"
    # A folder or a switch the user chose is kept.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    assert compiling.setup_cache() == tmp_path / "mine"
    assert not functorch_config.enable_autograd_cache


def square_sum(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=-1)


def test_a_failing_compile_warns_once_and_runs_eagerly(monkeypatch, capsys):
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)
    torch._dynamo.reset()
    f = compiling.maybe_compile(square_sum, "default", "test network")
    x = torch.randn(3, 4)
    for _ in range(3):
        assert torch.equal(f(x), square_sum(x))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("threed: warning: compiling the test network (mode default) failed")
    assert "no compiler here" in err[0] and err[0].endswith("it runs eagerly")
    assert not f.active and len(calls) == 1  # never tried again
    torch._dynamo.reset()


def test_a_failure_at_the_second_call_also_falls_back(monkeypatch, capsys):
    """CUDA graphs record at the second call: a failure there is caught too, not only the compile's."""
    runs = []

    def flaky_backend(gm, example_inputs):
        def run(*args):
            runs.append(1)
            if len(runs) == 2:
                raise RuntimeError("capture failed")
            return gm(*args)
        return run

    monkeypatch.setattr(compiling, "BACKEND", flaky_backend)
    torch._dynamo.reset()
    f = compiling.maybe_compile(square_sum, "reduce-overhead", "test network")
    x = torch.randn(3, 4)
    results = [f(x) for _ in range(4)]
    assert all(torch.equal(r, square_sum(x)) for r in results)
    assert not f.active and len(runs) == 2
    assert "capture failed" in capsys.readouterr().err
    torch._dynamo.reset()


def test_a_differentiable_function_compiles_its_backward_inside_the_guard(monkeypatch, capsys):
    """AOT autograd compiles a backward at the first backward(), which in training happens in the trainer,
    outside the guard: the first call runs a trial backward so that a failing backward compile falls back
    here, and the training backward that follows is the eager one."""
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(gm, example_inputs):
        raise RuntimeError("backward compiler broke")

    monkeypatch.setattr(compiling, "BACKEND", aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=no_backward))
    torch._dynamo.reset()
    f = compiling.maybe_compile(square_sum, "default", "encoder", differentiable=True)
    x = torch.randn(3, 4, requires_grad=True)
    f(x).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach())
    assert not f.active and "backward compiler broke" in capsys.readouterr().err
    torch._dynamo.reset()


def two_cameras(size: int = 12):
    return make_cameras(torch.tensor([10.0, 70.0]), torch.tensor([0.0, 180.0]), torch.full((2,), 2.0),
                        torch.full((2,), 50.0), size, size)


def guidance_run(model_dir, steps: int = 2, **sd) -> tuple[StableDiffusionGuidance, list[float], torch.Tensor]:
    """Losses of `steps` guidance calls on one batch of renders, and the render's summed gradient."""
    cfg = GuidanceConfig(sd=SDConfig(model=str(model_dir), resolution=16, **sd))
    g = StableDiffusionGuidance(Config(guidance=cfg, prompt="a yellow rubber duck", seed=3), "cpu")
    rgb = torch.rand(2, 12, 12, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    outs = [g(rgb, two_cameras(), step) for step in range(steps)]
    sum(o["loss"] for o in outs).backward()
    return g, [o["loss"].item() for o in outs], rgb.grad


def test_compiled_tiny_autoencoder_matches_eager(tiny_sd_dir, tiny_taesd_dir, aot_eager, capsys):
    """The encoder (the differentiated network) through dynamo + AOT autograd gives eager's losses and
    render gradients over two steps. Measured (2-core CPU): losses 1.3e-6 apart relative, gradients 2.4e-6
    at most (entries up to 0.25): AOT autograd decomposes some operators and CFG 100 amplifies the
    rounding, so bitwise equality is not expected. Tolerances ~10x."""
    tiny = dict(vae="tiny", tiny_vae_model=str(tiny_taesd_dir))
    _, losses, grad = guidance_run(tiny_sd_dir, **tiny)
    g, losses_c, grad_c = guidance_run(tiny_sd_dir, compile_vae="default", **tiny)
    assert isinstance(g._encode, compiling.CompiledFunction) and g._encode.active and g._noise == g._noise_eager
    assert g._encode.seconds > 0 and g.compile_time_s == g._encode.seconds
    assert losses_c == pytest.approx(losses, rel=2e-5)
    assert grad.abs().max() > 0.1 and torch.allclose(grad_c, grad, rtol=0, atol=3e-5)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("threed: compiled")]
    assert len(lines) == 1 and "tiny VAE encoder default" in lines[0]


@pytest.mark.slow
def test_compiled_guidance_matches_eager_and_traces_whole(tiny_sd_dir, aot_eager):
    """SD's VAE encoder (with its backward) and the UNet compiled: the same losses and render gradients as
    eager, over two steps (the second runs the compiled code without compiling). Measured (2-core CPU):
    losses differ by 2.2e-6 relative, gradients by 6.6e-6 at most (entries up to 0.64) - AOT autograd's
    decompositions round differently and CFG 100 amplifies the UNet's difference; tolerances ~15x.
    Takes ~45 s here, most of it tracing.

    Dynamo also traces each network as one graph (no graph breaks): a break would split the GPU's CUDA
    graph and add launches between the pieces."""
    _, losses, grad = guidance_run(tiny_sd_dir)
    g, losses_c, grad_c = guidance_run(tiny_sd_dir, compile="default", compile_vae="default")
    assert g._encode.active and g._noise.active and g._encode.seconds > 0 and g._noise.seconds > 0
    assert losses_c == pytest.approx(losses, rel=3e-5)
    assert grad.abs().max() > 0.1 and torch.allclose(grad_c, grad, rtol=0, atol=1e-4)

    rgb = torch.rand(2, 12, 12, 3)
    z = g._encode_eager(rgb).detach()
    t = torch.tensor([10, 500])
    cond, uncond = g.prompts.for_cameras(two_cameras())
    for fn, args in ((g._encode_eager, (rgb,)), (g._noise_eager, (z, t, cond, uncond))):
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
