"""One GPU measurement session, in priority order, inside a fixed time budget: run it once on a bare CUDA
machine and read the table it prints last.

    bash examples/gpu_wheels.sh                    # here, with the package index: .whl/ (~19 MB)
    python3 examples/gpu_session.py --out "$OUT"   # there (installs .whl/ itself); --budget 460 s by default
    python3 examples/gpu_session.py --out /tmp/s --dry-run   # the same plan on a CPU with tiny models

Parts, each a subprocess with its own timeout, skipped when the budget cannot cover them, in this order:
  setup  install the carried wheels; GPU, torch and Triton versions
  build  SD-2.1-base's real architecture and TAESD's with random weights (fp16, built on the GPU)
  a      pytest -m cuda tests/ (hash grid, renderer, guidance, whole runs, oracle, rasterizer, DMTet, bake)
         and tests/test_hashgrid_triton.py with the compiled kernels
  b      benchmark_step.py, dreamfusion-sd: b1 the baseline (PyTorch field, eager guidance), b2 the new
         configuration (Triton field where threed has it, compiled guidance) with a cold compile cache, b3
         the same with the cache warm
  e      examples/benchmark_hashgrid.py and examples/benchmark_render.py, where present
  g      examples/benchmark_rasterize.py at 512^2, 10k and 100k faces
  m      examples/benchmark_fine.py: Magic3D's mesh stage at 512^2 (it/s, phase split, peak)
  v      examples/benchmark_vsd.py: ProlificDreamer's VSD step against SDS at 64^2 and 512^2 (LoRA branch, peak)
  p      threed run, prolificdreamer's three stages at 512^2 (NeRF under VSD, geometry under SDS on normal maps,
         texture under VSD), 30 steps each, textured export: each stage's it/s and peak memory
  mv     threed run, mvdream with MVDream's real-size architecture and random weights (built on the GPU,
         saved in fp16): 30 steps at 64^2 x 8 views and 30 at 256^2 x 4 views, each run's it/s and peak memory
  fa     threed run, fantasia3d's two stages at 512^2 (geometry from a sphere on normal maps, its latent
         warm-up included; appearance under split-sum lighting), 30 steps each, PBR export: it/s and peak per stage
  z      examples/benchmark_zero123.py: the zero123 preset's 64², 128² and 256² stages (batches 12, 8, 4)
         with Zero123's real-size architecture, random weights: it/s and peak memory per stage
  s      threed run, dreamgaussian's two stages (Gaussians 128² to 512², 50 texture steps at 512²), textured
         export: each stage's it/s and peak memory, the whole run's wall time; then the image recipe with
         Zero123's real-size architecture (random weights). On gsplat's kernels, which build in the background
         from the start, if they built (then their agreement test first), else on threed's rasterizer
  c      the fast preset (tiny autoencoder), compiled
  f      threed run, dreamfusion-sd, 1000 steps and mesh export (no video), timed
  d      guidance floors, eager and compiled (benchmark_guidance.py)
`--skip b,e,g,c,f,d` leaves a session to the mesh stage and ProlificDreamer (m, v, p) after the CUDA tests.
Writes to --out: summary.txt (the table), results.json (every part's numbers), log.txt (each part's output,
its tail when long), cuda_tests.jsonl (errors the CUDA tests measured). Everything else stays in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # threed itself, to read the runs' records (the parts get it through PYTHONPATH)
LOG_TAIL_LINES = 400
# a random Zero123 of the real architecture (or tiny) and an orange disc to lift, for part s's image run
ZERO123_BUILD = ("import sys, numpy as np; from pathlib import Path; from PIL import Image\n"
                 "from threed.random_models import build_zero123, tiny_zero123_ldm_config\n"
                 "from threed.guidance.zero123_model import ZERO123_LDM_CONFIG\n"
                 "full = sys.argv[4] == 'full'\n"
                 "build_zero123(Path(sys.argv[1]), ZERO123_LDM_CONFIG if full else tiny_zero123_ldm_config(), "
                 "device=sys.argv[3])\n"
                 "yy, xx = np.mgrid[:256, :256]; image = np.zeros((256, 256, 4), np.uint8)\n"
                 "image[(yy - 128) ** 2 + (xx - 128) ** 2 < 90 ** 2] = (230, 140, 30, 255)\n"
                 "Image.fromarray(image, 'RGBA').save(sys.argv[2])\n")
GSPLAT_AGREEMENT = "tests/test_splat_gsplat.py::test_gsplat_agrees_with_threeds_rasterizer_on_cuda"


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.results: dict = {"budget_s": args.budget, "dry_run": args.dry_run, "parts": {}}
        self.log = open(self.out / "log.txt", "w")
        self.env = dict(os.environ)
        site = str(self.work / "site")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (site, str(REPO), self.env.get("PYTHONPATH", "")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["HF_HUB_OFFLINE"] = "1"
        self.env["THREED_CACHE"] = str(self.work / "threed-cache")  # starts empty: the first compile is cold
        self.env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        self.env["THREED_TEST_REPORT"] = str(self.out / "cuda_tests.jsonl")
        self.models = self.work / "models"
        self.env["THREED_SD21_RANDOM"] = str(self.models / "sd")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, text: str) -> None:
        stamp = f"[{time.monotonic() - self.start:6.1f} s] "
        print(stamp + text, flush=True)
        self.log.write(stamp + text + "\n")
        self.log.flush()

    def run(self, name: str, cmd: list[str], timeout: float, need: float = 20.0) -> dict:
        """Run one part; its output goes to work/<name>.log and its tail to log.txt. Skipped when less than
        `need` seconds of the budget are left; cut at min(timeout, what is left)."""
        left = self.left()
        if left < need:
            record = {"cmd": " ".join(cmd), "status": "skipped",
                      "why": f"{left:.0f} s of the budget left, {need:.0f} s needed"}
            self.note(f"{name}: skipped ({record['why']})")
            self.results["parts"][name] = record
            return record
        return self.finish(self.launch(name, cmd, f"limit {max(1.0, min(timeout, left)):.0f} s"), timeout)

    def launch(self, name: str, cmd: list[str], why: str = "in the background") -> tuple:
        """Start one part without waiting for it (finish() collects it)."""
        self.note(f"{name}: {' '.join(cmd)}  ({why})")
        log_path = self.work / f"{name}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return name, cmd, proc, log, log_path, time.monotonic()

    def finish(self, started: tuple, timeout: float) -> dict:
        """Wait for a started part up to min(timeout, what is left of the budget), then record it."""
        name, cmd, proc, log, log_path, start = started
        limit = max(1.0, min(timeout, self.left()))
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the compile workers too
            proc.wait()
            rc, status = None, f"timed out after {time.monotonic() - start:.0f} s"
        log.close()
        record: dict = {"cmd": " ".join(cmd), "status": status, "rc": rc,
                        "seconds": round(time.monotonic() - start, 1), "log": str(log_path)}
        lines = log_path.read_text(errors="replace").splitlines()
        shown = lines[-LOG_TAIL_LINES:]
        self.log.write(f"\n===== {name}: {status}, {record['seconds']} s, {len(lines)} lines"
                       f"{' (tail)' if len(lines) > len(shown) else ''} =====\n" + "\n".join(shown) + "\n\n")
        self.log.flush()
        self.note(f"{name}: {status} in {record['seconds']} s")
        self.results["parts"][name] = record
        return record

    def json_of(self, name: str, path: Path) -> dict | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        self.results["parts"][name]["result"] = data
        return data

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))


def python() -> str:
    return sys.executable or "python3"


def setup(s: Session) -> None:
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if wheels and not s.args.dry_run:
        s.run("setup-wheels", [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", str(s.work / "site"), *map(str, wheels)],
              timeout=90, need=5)
    probe = ("import json, platform, torch, typing\n"
             "from threed.config import FieldConfig\n"
             "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
             "        'cuda': torch.cuda.is_available(),\n"
             "        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,\n"
             "        'field_backends': list(typing.get_args(typing.get_type_hints(FieldConfig)['backend']))}\n"
             "for m in ('triton', 'diffusers', 'transformers', 'accelerate', 'nerfacc', 'imageio_ffmpeg', 'open_clip', "
             "'gsplat'):\n"
             "    try:\n"
             "        mod = __import__(m); info[m] = getattr(mod, '__version__', 'yes')\n"
             "    except Exception as e:\n"
             "        info[m] = 'missing: ' + type(e).__name__\n"
             "print(json.dumps(info))\n")
    rec = s.run("setup-probe", [python(), "-c", probe], timeout=60, need=5)
    try:
        s.results["environment"] = json.loads(Path(rec["log"]).read_text().strip().splitlines()[-1])
    except (KeyError, OSError, ValueError, IndexError):
        s.results["environment"] = {}
    if not s.args.dry_run:
        s.run("setup-nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,"
                                                 "temperature.gpu,power.draw", "--format=csv"], timeout=20, need=5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-session"))
    p.add_argument("--work", default="/tmp/threed-gpu-session")
    p.add_argument("--budget", type=float, default=460.0, help="seconds for the whole session")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out, e.g. e,f")
    p.add_argument("--dry-run", action="store_true", help="the same plan on a CPU with tiny models and sizes")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    s = Session(args)
    dry = args.dry_run
    py = python()
    from threed.rundir import RunDir  # from REPO (sys.path above): the runs' records
    dev = ["--device", "cpu"] if dry else ["--device", "cuda"]
    s.note(f"threed GPU session: budget {args.budget:.0f} s, out {s.out}, work {s.work}{' (dry run)' if dry else ''}")

    setup(s)
    env = s.results.get("environment", {})
    # the Triton grid runs on CUDA (on a CPU only under the interpreter, far too slow for a dry run)
    new_field = "triton" if "triton" in env.get("field_backends", []) and not dry else "torch"
    s.results["new_field_backend"] = new_field

    # gsplat's CUDA kernels build (nvcc, minutes on a fresh machine) on the CPUs while the GPU parts run; part s
    # waits for them, and its run and gsplat's agreement test use them
    gsplat_build = None
    if "s" not in skip and not dry and not str(env.get("gsplat", "missing")).startswith("missing"):
        gsplat_build = s.launch("s-gsplat-build", [py, "-c", "from threed.render.splat_gsplat import ensure_kernels; "
                                                            "ensure_kernels()"])

    build = [py, "examples/benchmark_step.py", "--build-models", str(s.models), *dev] + (["--tiny-sd"] if dry else [])
    s.run("build", build, timeout=150, need=30)
    sd, taesd = str(s.models / "sd"), str(s.models / "taesd")

    # (a) the CUDA tests (they skip on a CPU)
    if "a" not in skip:
        s.run("a-cuda-tests", [py, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/", "-p", "no:cacheprovider",
                               "--deselect", GSPLAT_AGREEMENT], timeout=200, need=60)  # gsplat's: in part s
        s.run("a-triton-grid-tests", [py, "-m", "pytest", "-q", "tests/test_hashgrid_triton.py", "-p",
                                      "no:cacheprovider"], timeout=60, need=20)

    # (b) one training step, the preset as it is
    # Options first, key=value overrides last (argparse takes the overrides as one trailing list).
    if dry:
        preset, step_opts, step_over = "cpu-tiny", ["--tiny-sd", "--steps", "2", "--warmup", "1"], ["guidance.sd.resolution=64"]
    else:
        preset, step_opts, step_over = "dreamfusion-sd", ["--steps", "15", "--warmup", "3"], []
    eager = ["guidance.sd.compile=none", "guidance.sd.compile_vae=none"]
    bench = [py, "examples/benchmark_step.py", *dev, *step_opts, "--model", sd]
    # b2 and b3 are the same configuration: cold (compiling) and warm (the compile cache filled by b2)
    plans = [("b1-baseline", "torch", eager, 100, 30), ("b2-compiled-cold", new_field, [], 260, 60),
             ("b3-new-warm", new_field, [], 150, 40)]
    for name, field, extra, timeout, need in plans:
        if "b" in skip:
            break
        out = s.work / f"{name}.json"
        rec = s.run(name, [*bench, "--preset", preset, "--label", name, "--json", str(out), *step_over,
                           f"field.backend={field}", *extra], timeout=timeout, need=need)
        if rec.get("status") == "ok":
            s.json_of(name, out)

    # (e) the renderer's and hash grid's own benchmarks, where this checkout has them
    if "e" not in skip:
        for script in ("benchmark_hashgrid.py", "benchmark_render.py"):
            if (REPO / "examples" / script).exists():
                s.run(f"e-{script[:-3]}", [py, f"examples/{script}"] + (["--device", "cpu"] if dry else []),
                      timeout=70, need=20)
            else:
                s.results["parts"][f"e-{script[:-3]}"] = {"status": "absent"}

    # (g) the mesh stage's rasterizer alone at 512^2 (issue 8): forward + backward
    if "g" not in skip:
        out = s.work / "g-rasterize.json"
        rec = s.run("g-rasterize", [py, "examples/benchmark_rasterize.py", "--json", str(out),
                                    *(["--device", "cpu", "--faces", "2000", "--resolution", "64"] if dry else
                                      ["--device", "cuda", "--faces", "10000,100000"])], timeout=60, need=20)
        if rec.get("status") == "ok":
            s.json_of("g-rasterize", out)

    # (m) Magic3D's mesh stage at 512^2 with the real-size SD (issue 8)
    if "m" not in skip:
        out = s.work / "m-fine.json"
        fine = [py, "examples/benchmark_fine.py", *dev, "--json", str(out)]
        fine += (["--tiny-sd", "--steps", "2", "--warmup", "1", "mesh.width=64", "mesh.height=64", "mesh.resolution=32"]
                 if dry else ["--model", sd, "--steps", "20", "--warmup", "5"])
        rec = s.run("m-mesh-stage", fine, timeout=240, need=60)
        if rec.get("status") == "ok":
            s.json_of("m-mesh-stage", out)

    # (v) ProlificDreamer's VSD step against SDS, 64^2 and 512^2 (issue 9); each in its own process
    if "v" not in skip:
        out = s.work / "v-vsd.json"
        vsd = [py, "examples/benchmark_vsd.py", *dev, "--json", str(out)]
        vsd += (["--tiny-sd", "--preset", "prolificdreamer-cpu", "--resolutions", "32", "--steps", "2", "--warmup", "1"]
                if dry else ["--model", sd, "--steps", "10", "--warmup", "3", "--phase-timeout", "150"])
        rec = s.run("v-vsd", vsd, timeout=420, need=90)
        if rec.get("status") == "ok":
            s.json_of("v-vsd", out)

    # (p) ProlificDreamer's three stages at 512^2 from the first step, as a run takes them
    if "p" not in skip:
        run_dir = s.work / "p-prolificdreamer"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not the resume of an earlier session's
        sizes = (["--preset", "prolificdreamer-cpu", "--steps", "2", "render.hires_width=32", "render.hires_height=32",
                  "guidance.sd.resolution=64", "geometry.steps=2", "geometry.resolution=16", "geometry.width=32",
                  "geometry.height=32", "texture.steps=2", "texture.width=32", "texture.height=32",
                  "export.texture_size=64"] if dry else
                 ["--steps", "30", "geometry.steps=30", "texture.steps=30", f"field.backend={new_field}"])
        rec = s.run("p-prolificdreamer", [py, "-m", "threed.cli", "run", "--method", "prolificdreamer", "--prompt",
                                          "a pineapple", "--model", sd, "--out", str(run_dir), "--quiet", *dev, *sizes,
                                          "render.hires_step=0", "export.video=false", "export.preview_views=0",
                                          "checkpoint_every=0"], timeout=300, need=90)
        _, done = RunDir(run_dir).metrics()
        if done:
            rec["result"] = done

    # (mv) MVDream's two phases, 64^2 x 8 views and 256^2 x 4 views, with the real-size multi-view model
    if "mv" not in skip:
        model = s.work / "mvdream"
        rec = s.run("mv-build", [py, "-c", "import sys, torch; from threed.random_models import build_random_mvdream; "
                                 "build_random_mvdream(sys.argv[1], sys.argv[2], torch.float16, sys.argv[3] == 'tiny')",
                                 str(model), "cpu" if dry else "cuda", "tiny" if dry else "full"], timeout=150, need=40)
        sizes = (["--steps", "2", "guidance.mvdream.resolution=32", "render.num_samples=16", "field.n_levels=4",
                  "field.log2_hashmap_size=12", "field.max_resolution=64", "export.resolution=32", "render.width=16",
                  "render.height=16", "render.hires_width=16", "render.hires_height=16"] if dry else
                 ["--steps", "30", f"field.backend={new_field}"])
        for name, phase in (("mv-64x8", ["render.hires_step=-1"]), ("mv-256x4", ["render.hires_step=0"])):
            if rec.get("status") != "ok":
                break
            run_dir = s.work / name
            shutil.rmtree(run_dir, ignore_errors=True)
            part = s.run(name, [py, "-m", "threed.cli", "run", "--method", "mvdream", "--prompt", "a yellow rubber duck",
                                "--model", str(model), "--out", str(run_dir), "--quiet", *dev, *sizes, *phase,
                                "export.video=false", "export.preview_views=0", "checkpoint_every=0"],
                         timeout=240, need=60)
            _, done = RunDir(run_dir).metrics()
            if done:
                part["result"] = done
    # (fa) Fantasia3D's two stages at 512^2, the geometry stage's latent warm-up taking half its steps
    if "fa" not in skip:
        run_dir = s.work / "fa-fantasia3d"
        shutil.rmtree(run_dir, ignore_errors=True)
        sizes = (["guidance.sd.resolution=64", "geometry.steps=2", "geometry.latent_steps=1", "geometry.resolution=16",
                  "geometry.width=32", "geometry.height=32", "appearance.steps=2", "appearance.width=32",
                  "appearance.height=32", "export.texture_size=64"] if dry else
                 ["geometry.steps=30", "geometry.latent_steps=15", "appearance.steps=30", f"field.backend={new_field}"])
        rec = s.run("fa-fantasia3d", [py, "-m", "threed.cli", "run", "--method", "fantasia3d", "--prompt",
                                      "a ceramic vase", "--model", sd, "--out", str(run_dir), "--quiet", *dev, *sizes,
                                      "export.video=false", "export.preview_views=0", "checkpoint_every=0"],
                    timeout=300, need=90)
    # (s) DreamGaussian's two stages as a run takes them: 500 steps of Gaussians (128² growing to 512²), the
    # mesh, 50 texture steps at 512², textured export: each stage's it/s and peak memory, the run's wall time;
    # on gsplat's kernels when they built (then first their agreement test), else on threed's rasterizer; then
    # the image recipe (500 steps at 512²) with Zero123's real-size architecture, random weights
    if "s" not in skip:
        backend = "torch"
        if gsplat_build is not None:
            if s.finish(gsplat_build, timeout=max(1.0, s.left() - 150)).get("status") == "ok":
                backend = "gsplat"
                s.run("s-gsplat-agreement", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                             GSPLAT_AGREEMENT], timeout=90, need=30)
        s.results["dreamgaussian_backend"] = backend
        tiny = ["render.width=16", "render.height=16", "gaussians.num_points=400", "gaussians.grow_steps=[2]",
                "gaussians.grow_sizes=[32]", "gaussians.densify_every=2", "export.resolution=32",
                "export.threshold=0.2", "texture.steps=2", "texture.resolution=16", "texture.width=32",
                "texture.height=32", "export.texture_size=64", "gaussians.texture_fit_steps=5"]
        # options first, key=value overrides last
        over = [f"gaussians.backend={backend}", "export.video=false", "export.preview_views=0", "checkpoint_every=0"]

        def dreamgaussian(name: str, opts: list[str], sizes: list[str]) -> None:
            run_dir = s.work / name
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not the resume of an earlier session's
            started = time.monotonic()
            rec = s.run(name, [py, "-m", "threed.cli", "run", "--method", "dreamgaussian", "--out", str(run_dir),
                               "--quiet", *dev, *opts, *(["--steps", "4"] if dry else []), *sizes, *over],
                        timeout=420, need=120)
            rec["end_to_end_s"] = round(time.monotonic() - started, 1)  # model load, both stages, export
            _, done = RunDir(run_dir).metrics()
            if done:
                rec["result"] = done

        dreamgaussian("s-dreamgaussian", ["--prompt", "a ripe strawberry", "--model", sd],
                      ["guidance.sd.resolution=64", *tiny] if dry else [])
        model, image = s.work / "zero123", s.work / "s-input.png"
        build_z = s.run("s-zero123-build", [py, "-c", ZERO123_BUILD, str(model), str(image), "cpu" if dry else "cuda",
                                            "tiny" if dry else "full"], timeout=150, need=200)
        if build_z.get("status") == "ok":
            dreamgaussian("s-dreamgaussian-image", ["--image", str(image), "--model", str(model)],
                          ["guidance.zero123.resolution=32", "image.size=64", "image.sizes=[[0, 24]]", *tiny]
                          if dry else [])
    # (z) image-to-3D: the zero123 preset's three resolution stages with Zero123's real-size architecture
    if "z" not in skip:
        out = s.work / "z-zero123.json"
        z123 = [py, "examples/benchmark_zero123.py", *dev, "--json", str(out)]
        z123 += ["--tiny", "--steps", "1", "--warmup", "1"] if dry else ["--steps", "10", "--warmup", "3"]
        rec = s.run("z-zero123", z123, timeout=300, need=90)
        if rec.get("status") == "ok":
            s.json_of("z-zero123", out)

    if "c" not in skip:
        out = s.work / "c-fast.json"
        fast = "cpu-tiny" if dry else "dreamfusion-sd-fast"
        extra = ["guidance.sd.vae=tiny"] if dry else []
        rec = s.run("c-fast-preset", [*bench, "--preset", fast, "--label", "c-fast", "--json", str(out), *step_over,
                                      f"field.backend={new_field}", f"guidance.sd.tiny_vae_model={taesd}", *extra],
                    timeout=150, need=40)
        if rec.get("status") == "ok":
            s.json_of("c-fast-preset", out)

    # (f) a short run end to end, export included (no video: no encoder is carried)
    if "f" not in skip:
        run_dir = s.work / "f-run"
        steps = "3" if dry else "1000"
        run_preset = ["--preset", "cpu-tiny", "guidance.sd.resolution=64"] if dry else ["--preset", "dreamfusion-sd"]
        rec = s.run("f-end-to-end", [py, "-m", "threed.cli", "run", "--prompt", "a yellow rubber duck", "--model", sd,
                                     "--steps", steps, "--out", str(run_dir), "--quiet", *dev, *run_preset,
                                     "export.video=false", f"field.backend={new_field}"], timeout=200, need=60)
        records, done = RunDir(run_dir).metrics()
        if records or done:
            rec["result"] = {"final": done, "last_logged": records[-1] if records else None,
                             "mesh": RunDir(run_dir).mesh_entries() or None}

    # (d) guidance floors; the encoder under CUDA graphs too if the budget allows it
    if "d" not in skip:
        out = s.work / "d-floors.json"
        floors = [py, "examples/benchmark_guidance.py", "--models", str(s.models), "--json", str(out), *dev]
        floors += ["--tiny-sd", "--backend", "aot_eager", "--iters", "2", "--warmup", "1", "--resolution", "64",
                   "--render", "32"] if dry else ["--iters", "20", "--warmup", "5"]
        if s.left() > 300:
            floors.append("--vae-cudagraphs")
        rec = s.run("d-floors", floors, timeout=200, need=40)
        if rec.get("status") == "ok":
            s.json_of("d-floors", out)

    s.save()
    table = summary(s)
    (s.out / "summary.txt").write_text(table + "\n")
    s.log.write("\n" + table + "\n")
    s.log.close()
    print("\n" + table, flush=True)


def stage_row(record: dict | None, stage: str) -> str:
    """One stage of a multi-stage run's closing record: train s | it/s | peak MB | start s | export s."""
    keys = ("wall_time_s", "it_per_s", "peak_memory_mb", "init_time_s", "export_time_s")
    return f"{stage} | " + " | ".join(str((record or {}).get(f"{stage}_{k}", "-")) for k in keys)


def summary(s: Session) -> str:
    """The table printed last: one line per measurement, '-' where a part did not run."""
    parts = s.results["parts"]
    env = s.results.get("environment", {})
    rows = [f"threed GPU session, {time.strftime('%Y-%m-%d')}, {env.get('gpu') or 'no GPU'}, torch {env.get('torch')}, "
            f"triton {env.get('triton')}, diffusers {env.get('diffusers')}; {s.results['elapsed_s']} s of "
            f"{s.results['budget_s']:.0f}" + (" (DRY RUN, CPU, tiny models)" if s.results["dry_run"] else ""),
            "part | status | seconds"]
    rows += [f"{name} | {r.get('status')} | {r.get('seconds', '-')}" for name, r in parts.items()]
    a = parts.get("a-cuda-tests")
    if a and a.get("log"):
        tail = [ln for ln in Path(a["log"]).read_text(errors="replace").splitlines() if ln.strip()]
        rows.append(f"cuda tests: {tail[-1] if tail else '-'}")
    rows.append("")
    rows.append("step (benchmark_step.py) | field | guidance compile | compile s | first step s | step ms | it/s | "
                "render / guidance / backward / optim ms (phase-synced) | peak MB")
    for name in ("b1-baseline", "b2-compiled-cold", "b3-new-warm", "c-fast-preset"):
        r = (parts.get(name) or {}).get("result")
        if not r:
            rows.append(f"{name} | - | - | - | - | - | - | - | -")
            continue
        modes = ", ".join(f"{k} {v.get('mode')}{' FELL BACK' if v.get('eager_fallback') else ''}"
                          for k, v in r["guidance_compile"].items())
        m = r["median_ms"]
        rows.append(f"{name} | {r['field_backend']}/{r['renderer_backend']} | {modes} | {r['compile_s']} | "
                    f"{r['first_step_s']} | {r['step_ms']} | {r['it_per_s']} | {m['render']} / {m['guidance']} / "
                    f"{m['backward']} / {m['optimizer']} | {r['peak_memory_mb']}")
    d = (parts.get("d-floors") or {}).get("result")
    rows.append("")
    rows.append("floor (benchmark_guidance.py, median ms) | eager | compiled")
    if d:
        keys = ["unet_cfg2", "vae_encode_backward", "cudagraphs_vae_encode_backward", "sds_step", "tiny_vae_encode_backward"]
        for k in keys:
            e, c = d["eager"].get(k, {}), d["compiled"].get(k, {})
            if e or c:
                rows.append(f"{k} | {e.get('median_ms', '-')} | {c.get('median_ms', '-')}"
                            + (f" | peak MB {e.get('peak_mb')} -> {c.get('peak_mb')}" if k == "sds_step" else ""))
        rows.append(f"compile s: {json.dumps(d.get('compile_s'))}")
    else:
        rows.append("- | - | -")
    f = (parts.get("f-end-to-end") or {}).get("result") or {}
    final = f.get("final") or {}
    rows.append("")
    rows.append(f"end to end (f): {parts.get('f-end-to-end', {}).get('status', '-')}, process "
                f"{parts.get('f-end-to-end', {}).get('seconds', '-')} s; train {final.get('wall_time_s', '-')} s at "
                f"{final.get('it_per_s', '-')} it/s (compile {final.get('compile_time_s', '-')} s inside), export "
                f"{final.get('export_time_s', '-')} s, peak {final.get('peak_memory_mb', '-')} MB, mesh {f.get('mesh')}")
    m = (parts.get("m-mesh-stage") or {}).get("result")
    rows.append("")
    rows.append("mesh stage (m) | render | faces | step ms | it/s | render / guidance / backward / optim ms | peak MB")
    if m:
        ph = m["median_ms"]
        rows.append(f"magic3d | {m['render']} | {m['faces']} | {m['step_ms']} | {m['it_per_s']} | {ph['render']} / "
                    f"{ph['guidance']} / {ph['backward']} / {ph['optimizer']} | {m['peak_memory_mb']}")
    else:
        rows.append("- | - | - | - | - | - | -")
    v = (parts.get("v-vsd") or {}).get("result")
    rows.append("")
    rows.append("VSD (v) | render | step ms | LoRA branch ms | peak MB")
    for r in (v or {}).get("results", []) or [{"phase": "-", "error": "did not run"}]:
        if "error" in r:
            rows.append(f"{r.get('phase')} | error: {r['error']}")
        else:
            rows.append(f"{r['method']} | {r['resolution']}² | {r['median_ms']['step']} | {r.get('lora_branch_ms', '')} | "
                        f"{r['peak_memory_mb']}")
    z = (parts.get("z-zero123") or {}).get("result")
    if z:
        for st in z.get("stages", []):
            rows.append(f"zero123 (z) {st['render']}² x {st['batch']}: {st['it_per_s']} it/s, peak "
                        f"{st['peak_memory_mb']} MB")
        rows.append(f"zero123 (z): 600 steps estimated at {z.get('estimated_train_s')} s of training")
    pd = (parts.get("p-prolificdreamer") or {}).get("result")
    rows.append("")
    rows.append("prolificdreamer (p), 512^2 | train s | it/s (first steps included) | peak MB | start s | export s")
    rows += [stage_row(pd, stage) for stage in ("nerf", "geometry", "texture")]
    rows.append("")
    rows.append("mvdream (mv), real-size model, random weights | train s | it/s (first steps included) | peak MB")
    for name in ("mv-64x8", "mv-256x4"):
        done = (parts.get(name) or {}).get("result") or {}
        rows.append(f"{name} | " + " | ".join(str(done.get(k, "-")) for k in ("wall_time_s", "it_per_s", "peak_memory_mb")))
    fa = (parts.get("fa-fantasia3d") or {}).get("result")
    rows.append("")
    rows.append("fantasia3d (fa), 512^2 | train s | it/s (first steps included) | peak MB | start s | export s")
    rows += [stage_row(fa, stage) for stage in ("geometry", "appearance")]
    build = parts.get("s-gsplat-build") or {}
    rows.append("")
    rows.append(f"dreamgaussian (s) on {s.results.get('dreamgaussian_backend', '-')}: gsplat's kernel build "
                f"{build.get('status', 'not started')} {build.get('seconds', '-')} s, agreement test "
                f"{(parts.get('s-gsplat-agreement') or {}).get('status', '-')}")
    for name in ("s-dreamgaussian", "s-dreamgaussian-image"):
        part = parts.get(name) or {}
        rows.append(f"{name}, end to end {part.get('end_to_end_s', '-')} s | train s | it/s | peak MB | start s | "
                    "export s")
        rows += [stage_row(part.get("result"), stage) for stage in ("gaussians", "texture")]
    measured = s.out / "cuda_tests.jsonl"
    if measured.exists():
        rows.append("")
        rows.append("measured by the CUDA tests:")
        rows += measured.read_text().splitlines()[-12:]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
