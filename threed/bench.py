"""`threed bench`: every (prompt, method, seed) with one step budget, scored the same way.

Each entry's config comes from threed/spec.py, as for `threed run`: the method from the registry
(aliases included), its preset, the model options that concern its prior, the plain `key=value`
overrides and its own `METHOD:key=value` ones. Each entry trains in a child process
(threed/bench_entry.py) in its own run directory, DIR/runs/<method>[-<prior>]/<prompt-slug>-s<seed>/,
so its peak memory is its own and a crash ends only that entry; with `--ray` the entries are Ray tasks
(threed/bench_ray.py) running the same child. Then each finished run is rendered from K evenly spaced
views (colour and textureless) and embedded by an evaluator CLIP; CLIP R-precision (DreamFusion) asks,
per method, how often a result's own prompt ranks first among all prompts of the benchmark. Alongside:
training time, it/s, peak memory, mesh faces and watertightness, and with --reference, Chamfer-L1 and
F-score for methods whose prior sees the reference (oracle).

Everything is resumable: a run whose metrics.jsonl holds its "done" record is not retrained, an
evaluation is cached in DIR/evals/ keyed by the run's final record and the evaluator, and every file is
written atomically, so a crash or Ctrl-C loses at most the entries in progress (they keep their
checkpoints).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from threed import methods as registry
from threed import spec
from threed.config import PRIOR_SECTIONS, Config, build_config, flatten, load_yaml, parse_override, preset_path, to_dict
from threed.errors import UserError
from threed.io import atomic_path, atomic_write_bytes, atomic_write_text

SHADINGS = ("albedo", "textureless")
DISTANCE_KEYS = ("chamfer_l1", "chamfer_l1_rel", "fscore_1pct", "fscore_2pct")  # threed.metrics.mesh_distance
DEFAULT_EVAL_CLIP = ("ViT-B-16", "openai")  # differs from the default guidance CLIP (ViT-B-32)
DEFAULT_METHODS = "dreamfusion,clip"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's own options; `threed run`'s model options are added by cli.py (shared definitions)."""
    p.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line (# starts a comment)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated: {', '.join(registry.names())} [{DEFAULT_METHODS}]")
    p.add_argument("--steps", type=int, required=True, help="optimisation steps for every run (the budget)")
    p.add_argument("--out", required=True, metavar="DIR", help="benchmark folder (runs, results, report)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds [0]")
    p.add_argument("--preset", action="append", default=[], metavar="[METHOD=]PRESET",
                   help="preset for every method, or METHOD=PRESET for one (repeatable) [each method's own; its "
                        "CPU preset where no CUDA GPU is visible]")
    p.add_argument("--eval-clip-model", dest="eval_clip_model", default=DEFAULT_EVAL_CLIP[0],
                   help=f"evaluator CLIP architecture (open_clip name) [{DEFAULT_EVAL_CLIP[0]}]")
    p.add_argument("--eval-clip-pretrained", dest="eval_clip_pretrained", default=DEFAULT_EVAL_CLIP[1],
                   help=f"evaluator weights: tag | checkpoint path | none [{DEFAULT_EVAL_CLIP[1]}]")
    p.add_argument("--eval-views", dest="eval_views", type=int, default=8, help="views per result (K) [8]")
    p.add_argument("--eval-size", dest="eval_size", type=int, default=224, help="render size of those views [224]")
    p.add_argument("--ray", nargs="?", const="auto", metavar="auto|local|ADDRESS",
                   help="run the entries as Ray tasks: auto (a running cluster, else a local one), local (a new "
                        "local one) or a cluster's address (pip install 'threed[ray]')")
    p.add_argument("--ray-cpus", dest="ray_cpus", type=float, default=1.0,
                   help="CPUs per Ray task [1]; each task also takes one GPU where the cluster has GPUs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- the plan ---------------------------------------------------------------------------------------

def method_label(method: str, prior: str) -> str:
    """A method's name in folders and tables: the method, and its prior when not the method's default."""
    return method if prior == registry.get(method).priors[0] else f"{method}-{prior}"


@dataclasses.dataclass
class Entry:
    method: str  # the registry's name
    prior: str  # guidance.type
    prompt: str
    prompt_index: int
    seed: int
    cfg: Config
    run_dir: Path
    eval_path: Path
    thumb_path: Path
    log_path: Path

    @property
    def label(self) -> str:
        return method_label(self.method, self.prior)

    @property
    def name(self) -> str:
        return f"{self.label}/{self.run_dir.name}"


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} not found: pass --prompts with a text file of one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text: pass a plain text file, one prompt per line") from None
    prompts: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text in seen:
            raise UserError(f"prompt '{text}' appears twice in {path} (lines {seen[text]} and {n}); "
                            f"R-precision needs distinct prompts: remove one")
        seen[text] = n
        prompts.append(text)
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts: write one prompt per line (# starts a comment)")
    return prompts


def get_method(name: str, where: str) -> registry.Method:
    """A method from the registry (aliases included); a prior's name gets the spelling that selects it."""
    try:
        return registry.get(name)
    except UserError:
        prior = spec.PRIOR_ALIASES.get(name.strip(), name.strip())
        if prior in spec.PRIORS:
            method = registry.for_prior(prior).name
            raise UserError(f"'{name.strip()}' in {where} is a prior, not a method: pass --methods {method} "
                            f"--guidance {prior}" + (" --reference MESH" if prior == "oracle" else "")) from None
        raise UserError(f"unknown method '{name.strip()}' in {where}: choose one of {', '.join(registry.names())}") from None


def parse_methods(text: str) -> list[registry.Method]:
    found: dict[str, registry.Method] = {}
    for name in (m.strip() for m in text.split(",")):
        if name:
            method = get_method(name, "--methods")
            found.setdefault(method.name, method)
    if not found:
        raise UserError("--methods is empty: pass e.g. --methods dreamfusion,clip")
    return list(found.values())


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"bad --seeds '{text}': write integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds is empty: pass e.g. --seeds 0,1")
    return list(dict.fromkeys(seeds))


def parse_presets(items: list[str], methods: list[registry.Method]) -> dict[str, str | None]:
    """--preset P (every method) and --preset METHOD=P (one method, whatever the order); None: the method's
    own preset, chosen by spec.resolve."""
    every: str | None = None
    own: dict[str, str] = {}
    names = [m.name for m in methods]
    for item in items:
        if "=" in item:
            name, preset = (s.strip() for s in item.split("=", 1))
            method = get_method(name, f"--preset {item}")
            if method.name not in names:
                raise UserError(f"--preset {item} is for method {method.name}, which is not in --methods "
                                f"({', '.join(names)}): add it or drop the preset")
            if method.name in own:
                raise UserError(f"two presets for method {method.name} (--preset {method.name}={own[method.name]} "
                                f"and --preset {item}): keep one")
            own[method.name] = preset
        else:
            if every is not None:
                raise UserError(f"two presets for every method (--preset {every} and --preset {item}): keep one, "
                                f"or write --preset METHOD=PRESET")
            every = item.strip()
    return {name: own.get(name, every) for name in names}


def split_overrides(items: list[str], methods: list[registry.Method]) -> tuple[list[str], dict[str, list[str]]]:
    """Plain `key=value` overrides (for every method) and `METHOD:key=value` ones (for that method)."""
    plain: list[str] = []
    own: dict[str, list[str]] = {m.name: [] for m in methods}
    for item in items:
        key = item.split("=", 1)[0]
        if ":" in key:
            name, rest = item.split(":", 1)
            method = get_method(name, f"the override {item}")
            if method.name not in own:
                raise UserError(f"the override {item} is for method {method.name}, which is not in --methods "
                                f"({', '.join(own)}): add it or drop the override")
            own[method.name].append(rest)
        else:
            if key.strip() == "guidance.type":
                raise UserError(f"{item} would set one prior for every method: pass --guidance "
                                f"{item.split('=', 1)[1].strip()} (applied to the methods that take it) or "
                                f"METHOD:guidance.type=... for one method")
            plain.append(item)
    return plain, own


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _prior_of_key(key: str) -> str | None:
    """The prior whose section `key` is in (guidance.sd.* -> stable_diffusion), or None."""
    for prior, section in PRIOR_SECTIONS.items():
        if key.startswith(f"guidance.{section}."):
            return prior
    return None


def method_prior(method: registry.Method, guidance: str | None, preset: str | None, own: list[str]) -> str:
    """The method's prior: its own guidance.type override, else --guidance where the method takes that prior,
    else its preset's, else its default."""
    for item in reversed(own):
        if _override_key(item) == "guidance.type":
            prior = spec.canonical_prior(str(parse_override(item)["guidance"]["type"]))
            if prior not in method.priors:
                raise UserError(f"{method.name}:{item}: method {method.name} takes the {' or '.join(method.priors)} "
                                f"prior, not {prior}: drop the override")
            return prior
    if guidance and spec.canonical_prior(guidance) in method.priors:
        return spec.canonical_prior(guidance)
    if preset:
        from_preset = (load_yaml(preset_path(preset)).get("guidance", {}) or {}).get("type")
        if from_preset:
            return str(from_preset)
    return method.priors[0]


def cuda_wanted(device: str | None, cluster_gpus: bool | None = None) -> bool:
    """Whether runs will have a CUDA GPU (picks each method's GPU or CPU preset), as `threed run` decides;
    with Ray, whether the cluster has GPUs."""
    device = device or "auto"
    if device.startswith("cuda"):
        return True
    if device not in ("auto", ""):
        return False
    if cluster_gpus is not None:
        return cluster_gpus
    import torch

    return torch.cuda.is_available()


def slugify(prompt: str) -> str:
    """Readable and collision-free: the prompt's words, cut to 48 characters, plus a short hash."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "prompt"
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def make_plan(args: argparse.Namespace, cuda: bool | None = None) -> tuple[list[Entry], list[str]]:
    """Every entry with its config (through spec.resolve, as `threed run`), and notes for the user.

    Model options (--model, --clip-model, --reference, ...) and plain overrides of a prior's section
    (guidance.sd.*, ...) go to the methods whose prior they concern; one that concerns no method of the
    bench is an error. `cuda`: whether the runs will see a CUDA GPU (None: this machine's)."""
    prompts = read_prompts(args.prompts)
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    if args.steps is None or args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.eval_views < 1:
        raise UserError("--eval-views must be at least 1")
    if args.eval_size < 8:
        raise UserError("--eval-size must be at least 8")
    if args.reference and not Path(args.reference).expanduser().is_file():
        raise UserError(f"reference mesh {args.reference} not found: pass an existing OBJ/PLY/GLB file")
    presets = parse_presets(args.preset, methods)
    plain, own = split_overrides(list(getattr(args, "overrides", None) or []), methods)
    opts = spec.RunOptions.from_args(args)
    priors = {m.name: method_prior(m, opts.guidance, presets[m.name], own[m.name]) for m in methods}
    used = ", ".join(f"{m.name} ({priors[m.name]})" for m in methods)
    if opts.guidance and spec.canonical_prior(opts.guidance) not in priors.values():
        prior = spec.canonical_prior(opts.guidance)
        raise UserError(f"--guidance {opts.guidance}: no method of this bench takes the {prior} prior ({used}); "
                        f"add --methods {registry.for_prior(prior).name}")
    def unused(what: str, prior: str) -> UserError:
        takers = [m.name for m in methods if prior in m.priors]
        fix = (f"pass --guidance {prior} ({', '.join(takers)} take{'s' if len(takers) == 1 else ''} it)" if takers
               else f"add --methods {registry.for_prior(prior).name}")
        return UserError(f"{what} concerns the {prior} prior, which no method of this bench uses ({used}): "
                         f"drop it, or {fix}")

    for name in spec.given(opts):
        concerns = spec.OPTIONS[name][1]
        if concerns is not None and concerns not in priors.values():
            raise unused(spec.flag(name), concerns)
    for item in plain:
        prior = _prior_of_key(_override_key(item))
        if prior is not None and prior not in priors.values():
            raise unused(item, prior)
    if cuda is None:
        cuda = cuda_wanted(args.device)
    notes: list[str] = []
    for m in methods:
        if presets[m.name]:
            from_preset = load_yaml(preset_path(presets[m.name])).get("method")
            if from_preset and registry.get(str(from_preset)).name != m.name:
                raise UserError(f"preset {presets[m.name]} is for method {from_preset}, not {m.name}: pass "
                                f"--preset METHOD=PRESET for each method (e.g. --preset {m.name}={m.preset})")
        else:
            preset, why = m.default_preset(priors[m.name], cuda)
            if why == "no CUDA GPU is visible":
                notes.append(f"no CUDA GPU is visible: {method_label(m.name, priors[m.name])} uses the {preset} "
                             f"preset (pass --preset {m.name}={m.preset} for the full-size one)")

    out = Path(args.out)
    plan = []
    for m in methods:
        prior = priors[m.name]
        label = method_label(m.name, prior)
        overrides = [o for o in plain if _prior_of_key(_override_key(o)) in (None, prior)] + own[m.name]
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                run_opts = dataclasses.replace(opts, method=m.name, preset=presets[m.name], guidance=prior,
                                               prompt=prompt, seed=seed, overrides=overrides)
                cfg, _ = spec.resolve(run_opts, cuda=cuda, only_concerning=True)
                if cfg.guidance.type == "oracle" and not cfg.guidance.oracle.reference:
                    raise UserError(f"{label} uses the oracle prior, which needs a reference mesh: pass --reference MESH")
                stem = f"{slugify(prompt)}-s{seed}"
                plan.append(Entry(m.name, prior, prompt, i, seed, cfg, out / "runs" / label / stem,
                                  out / "evals" / label / f"{stem}.json", out / "thumbs" / label / f"{stem}.png",
                                  out / "logs" / label / f"{stem}.log"))
    return plan, notes


def _as_evaluator_error(e: UserError) -> UserError:
    """A CLIP loading error phrased for the evaluator's own flags."""
    text = str(e).replace("--clip-pretrained", "--eval-clip-pretrained").replace("--clip-model", "--eval-clip-model")
    return UserError(f"evaluator CLIP: {text}")


def check_weights(plan: list[Entry], eval_model: str, eval_pretrained: str) -> None:
    """Every model the benchmark will need is on disk (or downloadable) before hours of training start."""
    from threed.clip_models import resolve_pretrained as resolve_clip
    from threed.guidance.hub import SD_SUBFOLDERS, pinned_revision
    from threed.guidance.hub import resolve_pretrained as resolve_sd

    try:
        resolve_clip(eval_model, eval_pretrained)
    except UserError as e:
        raise _as_evaluator_error(e) from None
    checked: set[tuple[str, ...]] = set()
    for e in plan:
        g = e.cfg.guidance
        needs: list[tuple[str, ...]] = list(zip(g.clip.models, g.clip.pretrained)) if g.type == "clip" else []
        if g.type == "stable_diffusion":
            needs.append(("sd", g.sd.model, g.sd.revision, g.sd.vae))
        for need in needs:
            if need in checked:
                continue
            checked.add(need)
            if need[0] == "sd":  # the files the run itself will ask for, at the same revision
                _, model, revision, vae = need
                required = tuple(p for p in SD_SUBFOLDERS if not (vae == "tiny" and p == "vae"))
                resolve_sd(model, "Stable Diffusion", required=required, revision=pinned_revision(model, revision))
            else:
                resolve_clip(*need)


# -- training -------------------------------------------------------------------------------------

def final_record(run_dir: Path) -> dict | None:
    """The run's "done" record from metrics.jsonl, or None while it is unfinished."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    done = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(rec, dict) and rec.get("done"):
            done = rec
    return done


def last_step(run_dir: Path) -> int:
    """The last step a run logged (its metrics.jsonl's tail), 0 if none: progress of a running entry."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode("utf-8", errors="ignore")
    except OSError:
        return 0
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def check_same_run(entry: Entry) -> None:
    """A run directory from an earlier bench must have been made with the same config."""
    saved_path = entry.run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved, wanted = flatten(to_dict(build_config(base=load_yaml(saved_path)))), flatten(to_dict(entry.cfg))
    ignored = {"device"}  # where it runs does not change what it computes
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k) and k not in ignored)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:3])
        raise UserError(f"{entry.run_dir} was made with other settings ({shown}); re-run with the same options "
                        f"or pass another --out")


class Progress:
    """One bar for the whole bench, counted in optimisation steps (so its ETA weighs long runs right), with
    entries done / running / failed beside it. Running entries' steps come from their metrics.jsonl."""

    POLL_S = 1.0

    def __init__(self, plan: list[Entry], statuses: dict[str, dict], quiet: bool):
        from threed.trainer import list_checkpoints
        from tqdm import tqdm

        from threed.pipeline import checkpoint_step

        self.plan, self.quiet = plan, quiet
        self.reached: dict[str, int] = {}
        for e in plan:
            if e.name in statuses:
                self.reached[e.name] = e.cfg.steps
            else:
                kept = list_checkpoints(e.run_dir)
                self.reached[e.name] = min(checkpoint_step(kept[-1]), e.cfg.steps) if kept else 0
        self.statuses = statuses
        self.running: dict[str, Entry] = {}
        self.started = time.time()
        self.last_poll = 0.0
        self.bar = tqdm(total=sum(e.cfg.steps for e in plan), initial=sum(self.reached.values()), unit="step",
                        desc="bench", disable=quiet, dynamic_ncols=True, smoothing=0.05)
        self._postfix()

    def _postfix(self) -> None:
        done = sum(s["status"] == "done" for s in self.statuses.values())
        failed = len(self.statuses) - done
        self.bar.set_postfix_str(f"entries: {done} done, {len(self.running)} running, {failed} failed, "
                                 f"{len(self.plan)} in all", refresh=True)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        if self.quiet:
            print(line, flush=True)
        else:
            tqdm.write(line)

    def start(self, entry: Entry) -> None:
        self.running[entry.name] = entry
        self._postfix()

    def finish(self, entry: Entry, status: dict) -> None:
        self.running.pop(entry.name, None)
        self.statuses[entry.name] = status
        self.reached[entry.name] = entry.cfg.steps
        self._update()

    def poll(self, candidates: list[Entry] | None = None) -> None:
        """Read the steps of running entries; `candidates` (Ray: every entry not finished) count as running
        once their log file was written by this bench."""
        now = time.monotonic()
        if now - self.last_poll < self.POLL_S:
            return
        self.last_poll = now
        if candidates is not None:
            for e in candidates:
                try:
                    if e.name not in self.running and e.log_path.stat().st_mtime >= self.started:
                        self.running[e.name] = e
                except OSError:
                    pass
        for e in self.running.values():
            self.reached[e.name] = max(self.reached[e.name], min(last_step(e.run_dir), e.cfg.steps))
        self._update()

    def _update(self) -> None:
        self.bar.n = sum(self.reached.values())
        self._postfix()

    def close(self) -> None:
        self.bar.close()


def tag(entry: Entry, plan: list[Entry]) -> str:
    return f"bench: [{plan.index(entry) + 1}/{len(plan)}] {entry.label} '{entry.prompt}' seed {entry.seed}"


def status_line(entry: Entry, plan: list[Entry], status: dict) -> str:
    if status["status"] == "done":
        return f"{tag(entry, plan)}: done"
    return f"{tag(entry, plan)}: {status['status']}: {status['error']}"


def pending(plan: list[Entry], progress_write) -> tuple[dict[str, dict], list[Entry]]:
    """Entries already done (skipped) and those to train; a run directory made with other settings is an
    error before anything starts."""
    for entry in plan:
        check_same_run(entry)
    statuses: dict[str, dict] = {}
    todo = []
    for entry in plan:
        if final_record(entry.run_dir) is not None:
            statuses[entry.name] = {"status": "done", "error": ""}
            progress_write(f"{tag(entry, plan)}: done already, skipped")
        else:
            todo.append(entry)
    return statuses, todo


def entry_task(entry: Entry) -> dict:
    """What a child needs to train an entry (plain data: it travels to Ray workers)."""
    return {"config": to_dict(entry.cfg), "run_dir": str(entry.run_dir.absolute()),
            "log_path": str(entry.log_path.absolute()), "cwd": os.getcwd()}


def train_serial(plan: list[Entry], todo: list[Entry], progress: Progress) -> None:
    """Each entry in a child process, one after another; a crash is retried once (as Ray would)."""
    from threed.bench_entry import RETRIES, run_entry
    from threed.trainer import list_checkpoints

    for entry in todo:
        resume = bool(list_checkpoints(entry.run_dir))
        progress.write(f"{tag(entry, plan)}: {'resuming' if resume else 'training'} in {entry.run_dir}")
        progress.start(entry)
        task = entry_task(entry)
        for attempt in range(1 + RETRIES):
            status = run_entry(task["config"], task["run_dir"], task["log_path"], task["cwd"], tick=progress.poll)
            if not status.pop("retry", False) or attempt == RETRIES:
                break
            progress.write(f"{tag(entry, plan)}: {status['error']}; retrying")
        progress.finish(entry, status)
        progress.write(status_line(entry, plan, status))


# -- evaluation -----------------------------------------------------------------------------------

class Evaluator:
    """The evaluator CLIP, loaded on first use."""

    def __init__(self, name: str, pretrained: str, device: str):
        self.name, self.pretrained, self.device = name, pretrained, device
        self._loaded: tuple | None = None

    def load(self) -> tuple:
        if self._loaded is None:
            from threed.clip_models import load_clip

            try:
                self._loaded = load_clip(self.name, self.pretrained, self.device)
            except UserError as e:
                raise _as_evaluator_error(e) from None
        return self._loaded

    def images(self, images: np.ndarray) -> np.ndarray:
        from threed.r_precision import clip_embed_images

        model, mean_std, _ = self.load()
        return clip_embed_images(model, mean_std, images).numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        from threed.r_precision import clip_embed_texts

        model, _, tokenizer = self.load()
        return clip_embed_texts(model, tokenizer, texts).numpy()


def mesh_stats(run_dir: Path, reference: str | None) -> dict:
    """Face count and watertightness of the run's mesh, and its distance to `reference` if given."""
    import trimesh

    path = next((run_dir / f"mesh.{ext}" for ext in ("obj", "ply", "glb") if (run_dir / f"mesh.{ext}").exists()), None)
    stats: dict[str, Any] = {"faces": 0, "watertight": False}
    mesh = None
    if path is not None:
        try:
            mesh = trimesh.load(path, force="mesh")
        except (ValueError, IndexError):  # an empty mesh file loads as nothing
            mesh = None
    if mesh is not None and len(mesh.faces) > 0:
        stats = {"faces": int(len(mesh.faces)), "watertight": bool(mesh.is_watertight)}
    if reference:
        from threed.metrics import mesh_distance

        if mesh is None or len(mesh.faces) == 0:
            stats.update({k: float("nan") for k in DISTANCE_KEYS})
        else:
            ref = trimesh.load(reference, force="mesh")
            stats.update({k: float(v) for k, v in mesh_distance(mesh, ref).items()})
    return stats


def eval_key(entry: Entry, evaluator: Evaluator, views: int, size: int, done: dict) -> dict:
    """What an evaluation depends on: a change in any of these re-evaluates the run."""
    return {"evaluator": [evaluator.name, evaluator.pretrained], "views": views, "size": size,
            "run": {k: done.get(k) for k in ("step", "wall_time_s")}}


def cached_evaluation(entry: Entry, key: dict) -> dict | None:
    if entry.eval_path.exists() and entry.thumb_path.exists():
        try:
            cached = json.loads(entry.eval_path.read_text())
            if cached.get("key") == key:
                return cached
        except json.JSONDecodeError:
            pass
    return None


def evaluate(entry: Entry, evaluator: Evaluator, views: int, size: int, device: str, step=None) -> dict:
    """Render, embed and measure one finished run, and write its thumbnail and cached evaluation.
    `step(what, views_done)` reports progress."""
    from threed import pipeline

    step = step or (lambda what, n: None)
    done = final_record(entry.run_dir) or {}
    step("loading", 0)
    trainer = pipeline.load_trainer(entry.run_dir, device)
    renders = {}
    for s in SHADINGS:
        step(f"rendering {s}", 0)
        renders[s] = pipeline.render_views(entry.run_dir, views, s, size, device, trainer=trainer)
        step(f"rendered {s}", views)
    result: dict[str, Any] = {"key": eval_key(entry, evaluator, views, size, done), "done": done}
    step("embedding", 0)
    for s in SHADINGS:
        result[f"emb_{s}"] = evaluator.images(renders[s]).round(6).tolist()
    step("mesh statistics", 0)
    reference = entry.cfg.guidance.oracle.reference if entry.prior == "oracle" else None
    result.update(mesh_stats(entry.run_dir, reference))
    write_thumbnail(entry.thumb_path, renders)
    atomic_write_text(entry.eval_path, json.dumps(result))
    return result


def evaluate_all(plan: list[Entry], evaluator: Evaluator, views: int, size: int, device: str,
                 quiet: bool) -> dict[str, dict | None]:
    """Every finished entry's evaluation: cached ones as they are, the others computed with a progress bar
    counted in rendered views."""
    from tqdm import tqdm

    evals: dict[str, dict | None] = {}
    todo = []
    for entry in plan:
        done = final_record(entry.run_dir)
        if done is None:
            evals[entry.name] = None
            continue
        evals[entry.name] = cached_evaluation(entry, eval_key(entry, evaluator, views, size, done))
        if evals[entry.name] is None:
            todo.append(entry)
    if not todo:
        return evals
    say = print if quiet else tqdm.write
    say(f"bench: evaluating {len(todo)} runs ({views} views x {len(SHADINGS)} shadings of {size} px each) with "
        f"the evaluator CLIP {evaluator.name} ({evaluator.pretrained}) on {device}")
    with tqdm(total=len(todo) * views * len(SHADINGS), unit="view", desc="evaluating", disable=quiet,
              dynamic_ncols=True) as bar:
        for entry in todo:
            def step(what: str, n: int, name: str = entry.name) -> None:
                bar.update(n)
                bar.set_postfix_str(f"{name}: {what}", refresh=True)

            if quiet:
                print(f"bench: evaluating {entry.name}", flush=True)
            evals[entry.name] = evaluate(entry, evaluator, views, size, device, step)
    return evals


def write_thumbnail(path: Path, renders: dict[str, np.ndarray], max_views: int = 4, side: int = 96) -> None:
    """Up to 4 views: colour on top, textureless below, each `side` px."""
    from PIL import Image

    from exporters.video import image_grid

    n = min(max_views, len(renders[SHADINGS[0]]))
    step = max(1, len(renders[SHADINGS[0]]) // n)
    tiles = []
    for s in SHADINGS:
        for im in renders[s][::step][:n]:
            tiles.append(np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR)))
    buf = io.BytesIO()
    Image.fromarray(image_grid(tiles, cols=n)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# -- results --------------------------------------------------------------------------------------

def guidance_clips(cfg: Config) -> set[tuple[str, str]]:
    from threed.clip_models import canonical_id

    if cfg.guidance.type != "clip":
        return set()
    return {canonical_id(n, p) for n, p in zip(cfg.guidance.clip.models, cfg.guidance.clip.pretrained)}


def collect(plan: list[Entry], statuses: dict[str, dict], evals: dict[str, dict | None],
            text_emb: np.ndarray | None, evaluator: Evaluator, out: Path) -> tuple[list[dict], list[dict]]:
    """Per-run rows and per-method summary rows (R-precision over each method's finished runs)."""
    import torch

    from threed.clip_models import canonical_id
    from threed.r_precision import prompt_ranks, prompt_similarity, r_precision

    eval_id = canonical_id(evaluator.name, evaluator.pretrained)
    rows = []
    for e in plan:
        ev = evals.get(e.name)
        done = final_record(e.run_dir) or {}  # the run's latest record (a cached evaluation may hold an older one)
        row: dict[str, Any] = {
            "method": e.method, "prior": e.prior, "prompt": e.prompt, "seed": e.seed,
            "status": statuses.get(e.name, {}).get("status", "missing"),
            "steps": done.get("step", ""), "wall_time_s": done.get("wall_time_s", ""),
            "segment_wall_time_s": done.get("segment_wall_time_s", ""),
            "it_per_s": done.get("it_per_s", ""), "peak_memory_mb": done.get("peak_memory_mb", ""),
            "device": done.get("device", ""),
        }
        if ev is not None and text_emb is not None:
            truth = torch.tensor([e.prompt_index])
            for s, short in zip(SHADINGS, ("color", "textureless")):
                emb = torch.tensor(ev[f"emb_{s}"], dtype=torch.float32)[None]
                sim = prompt_similarity(emb, torch.from_numpy(text_emb))[0]
                row[f"clip_sim_{short}"] = round(float(sim[e.prompt_index]), 4)
                row[f"rank_{short}"] = int(prompt_ranks(emb, torch.from_numpy(text_emb), truth)[0])
            row["faces"], row["watertight"] = ev["faces"], ev["watertight"]
            for k in DISTANCE_KEYS:
                if k in ev:
                    row[k] = ev[k]
        row["run_dir"] = str(e.run_dir.relative_to(out)) if e.run_dir.is_relative_to(out) else str(e.run_dir)
        row["thumbnail"] = str(e.thumb_path.relative_to(out)) if e.thumb_path.exists() else ""
        row["error"] = statuses.get(e.name, {}).get("error", "")
        rows.append(row)

    summary = []
    for method in dict.fromkeys(e.method for e in plan):  # one prior per method in a bench
        entries = [e for e in plan if e.method == method]
        scored = [e for e in entries if evals.get(e.name) is not None]
        inflated = any(eval_id in guidance_clips(e.cfg) for e in entries)
        mrows = [r for r in rows if r["method"] == method and r["status"] == "done"]
        s: dict[str, Any] = {"method": method, "prior": entries[0].prior, "runs": len(entries),
                             "finished": len(scored), "inflated": inflated}
        for shading, short in zip(SHADINGS, ("color", "textureless")):
            if scored and text_emb is not None:
                emb = torch.tensor([evals[e.name][f"emb_{shading}"] for e in scored], dtype=torch.float32)
                truth = torch.tensor([e.prompt_index for e in scored])
                s[f"r_at_1_{short}"] = round(r_precision(emb, torch.from_numpy(text_emb), truth, k=1), 4)
            else:
                s[f"r_at_1_{short}"] = float("nan")
        s["mean_clip_sim_color"] = _mean([r.get("clip_sim_color") for r in mrows])
        s["mean_wall_time_s"] = _mean([r["wall_time_s"] for r in mrows])
        s["mean_it_per_s"] = _mean([r["it_per_s"] for r in mrows])
        s["max_peak_memory_mb"] = max([r["peak_memory_mb"] for r in mrows if r["peak_memory_mb"] != ""], default=float("nan"))
        s["mean_faces"] = _mean([r.get("faces") for r in mrows])
        s["watertight_fraction"] = _mean([float(r["watertight"]) for r in mrows if "watertight" in r])
        for k in ("chamfer_l1", "fscore_1pct"):
            vals = [r.get(k) for r in mrows if k in r]
            if vals:
                s[f"mean_{k}"] = _mean(vals)
        summary.append(s)
    return rows, summary


def _mean(values: list) -> float:
    vals = [float(v) for v in values if v not in (None, "") and not (isinstance(v, float) and math.isnan(v))]
    return round(sum(vals) / len(vals), 4) if vals else float("nan")


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        text = f"{v:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(v)


def _rank(rank: int | None) -> str:
    return "–" if rank is None else str(rank + 1)


def write_plots(out: Path, rows: list[dict], summary: list[dict], chance: float) -> list[str]:
    """r_precision.png, time.png, quality_vs_time.png (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = [s["method"] for s in summary]
    x = np.arange(len(methods))

    def save(fig, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(methods) + 2), 3.2))
    for j, (short, label) in enumerate((("color", "colour"), ("textureless", "textureless"))):
        vals = [np.nan_to_num(s[f"r_at_1_{short}"], nan=0.0) for s in summary]
        ax.bar(x + (j - 0.5) * 0.38, vals, width=0.38, label=label)
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    labels = [method_label(s["method"], s["prior"]) for s in summary]
    ax.set_xticks(x, [m + (" *" if s["inflated"] else "") for m, s in zip(labels, summary)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("CLIP R@1")
    ax.set_title("CLIP R-precision per method" + (" (* inflated)" if any(s["inflated"] for s in summary) else ""))
    ax.legend(fontsize=8)
    save(fig, "r_precision.png")

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(methods) + 2), 3.2))
    times = [[float(r["wall_time_s"]) for r in rows if r["method"] == m and r["wall_time_s"] != ""] for m in methods]
    means = [np.mean(t) if t else 0.0 for t in times]
    lo = [means[i] - min(t) if t else 0.0 for i, t in enumerate(times)]
    hi = [max(t) - means[i] if t else 0.0 for i, t in enumerate(times)]
    ax.bar(x, means, yerr=[lo, hi], capsize=4, color="tab:orange")
    ax.set_xticks(x, labels)
    ax.set_ylabel("training time per run (s)")
    ax.set_title("Time per method (mean, min-max)")
    save(fig, "time.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, label in zip(methods, labels):
        pts = [(float(r["wall_time_s"]), float(r["clip_sim_color"])) for r in rows
               if r["method"] == m and r["wall_time_s"] != "" and r.get("clip_sim_color") is not None]
        if pts:
            ax.scatter(*zip(*pts), label=label, s=30)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("evaluator CLIP similarity to own prompt")
    ax.set_title("Quality against time (one point per run)")
    if any(r.get("clip_sim_color") is not None for r in rows):
        ax.legend(fontsize=8)
    save(fig, "quality_vs_time.png")
    return written


def write_report(out: Path, meta: dict, rows: list[dict], summary: list[dict], plots: list[str]) -> None:
    ev = meta["evaluator"]
    lines = [
        "# threed benchmark", "",
        f"Command: `{meta['command']}`", "",
        f"{len(meta['prompts'])} prompts × {len(meta['methods'])} methods × {len(meta['seeds'])} seeds, "
        f"{meta['steps']} steps each. Evaluator CLIP: {ev[0]} ({ev[1]}), {meta['views']} views of "
        f"{meta['size']} px per result, colour (albedo) and textureless. R@1 chance level: {meta['chance']:.3f}.", "",
        "## Summary", "",
        "| method | runs done | R@1 colour | R@1 textureless | CLIP sim | time (s) | it/s | peak mem (MB) | faces | watertight |"
        + (" Chamfer-L1 | F-score@1% |" if any("mean_chamfer_l1" in s for s in summary) else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if any("mean_chamfer_l1" in s for s in summary) else ""),
    ]
    for s in summary:
        mark = " (inflated)" if s["inflated"] else ""
        line = (f"| {method_label(s['method'], s['prior'])} | {s['finished']}/{s['runs']} | {_fmt(s['r_at_1_color'])}{mark} | "
                f"{_fmt(s['r_at_1_textureless'])}{mark} | {_fmt(s['mean_clip_sim_color'])} | "
                f"{_fmt(s['mean_wall_time_s'])} | {_fmt(s['mean_it_per_s'])} | {_fmt(s['max_peak_memory_mb'])} | "
                f"{_fmt(s['mean_faces'], 0)} | {_fmt(s['watertight_fraction'], 2)} |")
        if any("mean_chamfer_l1" in t for t in summary):
            line += f" {_fmt(s.get('mean_chamfer_l1'), 4)} | {_fmt(s.get('mean_fscore_1pct'))} |"
        lines.append(line)
    if any(s["inflated"] for s in summary):
        lines += ["", "*Inflated*: the evaluator CLIP is also the guidance CLIP of that method, which was optimised "
                  "to please it; pick another --eval-clip-model for a fair score."]
    lines += ["", "R@1: fraction of a method's results whose own prompt has the highest evaluator-CLIP similarity "
              "(averaged over views) among all prompts of the benchmark. CLIP sim: mean similarity to the own prompt "
              "(colour). Time: training steps only, per run, summed over resumed segments. Peak memory: of the run's own "
              "process (each run trains in a child process): GPU memory allocated on CUDA, else its peak resident "
              "memory. Watertight: fraction of meshes that are closed manifolds.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Runs", "", "| method | prompt | seed | status | rank colour | rank textureless | CLIP sim | time (s) "
              "| it/s | faces | watertight | preview |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thumb = f"![]({r['thumbnail']})" if r["thumbnail"] else ""
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        lines.append(f"| {method_label(r['method'], r['prior'])} | {r['prompt'].replace('|', '/')} | {r['seed']} | {status.replace('|', '/')} | "
                     f"{_rank(r.get('rank_color'))} | {_rank(r.get('rank_textureless'))} | "
                     f"{_fmt(r.get('clip_sim_color'))} | {_fmt(r['wall_time_s'])} | {_fmt(r['it_per_s'])} | "
                     f"{_fmt(r.get('faces'))} | {_fmt(r.get('watertight'))} | {thumb} |")
    lines += ["", "Rank: position of the run's own prompt among all prompts (1 = retrieved)."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def write_outputs(out: Path, meta: dict, rows: list[dict], summary: list[dict]) -> list[Path]:
    """Everything the bench writes from its results: tables, plots and report (one place to add to)."""
    write_csv(out / "results.csv", rows)
    atomic_write_text(out / "results.json", json.dumps(_json_safe({"benchmark": meta, "summary": summary,
                                                                   "runs": rows}), indent=1))
    plots = write_plots(out, rows, summary, meta["chance"])
    write_report(out, meta, rows, summary, plots)
    from threed.report import write_bench_report

    page = write_bench_report(out, rows, summary, meta)
    return [out / "results.csv", out / "results.json", out / "report.md", Path(page), *(out / p for p in plots)]


# -- the command ----------------------------------------------------------------------------------

def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces (and resumes) this benchmark."""
    import shlex

    parts = ["threed", "bench", "--prompts", args.prompts, "--methods", args.methods, "--steps", str(args.steps),
             "--out", str(args.out), "--seeds", args.seeds]
    for item in args.preset:
        parts += ["--preset", item]
    for name in spec.OPTIONS:
        if name not in ("prompt", "steps", "seed") and getattr(args, name, None) is not None:
            parts += [spec.flag(name), str(getattr(args, name))]
    if getattr(args, "guidance", None):
        parts += ["--guidance", args.guidance]
    parts += ["--eval-clip-model", args.eval_clip_model, "--eval-clip-pretrained", args.eval_clip_pretrained,
              "--eval-views", str(args.eval_views), "--eval-size", str(args.eval_size)]
    if getattr(args, "ray", None):
        parts += [f"--ray={args.ray}", "--ray-cpus", f"{args.ray_cpus:g}"]
    parts += list(getattr(args, "overrides", None) or [])
    return " ".join(shlex.quote(str(p)) for p in parts)


def main(args: argparse.Namespace) -> None:
    cluster = None
    if getattr(args, "ray", None):
        if "=" in args.ray:
            raise UserError(f"--ray took the override {args.ray} as its address: write --ray=auto (or local, or an "
                            f"address) before key=value overrides")
        from threed import bench_ray

        read_prompts(args.prompts)  # bad input fails before a cluster starts
        parse_methods(args.methods)
        cluster = bench_ray.connect(args.ray)
    try:
        run(args, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def run(args: argparse.Namespace, cluster=None) -> None:
    """The bench: plan, train (serially, or on `cluster`, a bench_ray.Cluster), evaluate, write results."""
    from tqdm import tqdm

    from threed.config import resolve_device
    from threed.pipeline import check_writable

    start = time.perf_counter()
    plan, notes = make_plan(args, cuda=cuda_wanted(args.device, cluster.gpus if cluster else None))
    if cluster is not None:
        cluster.check(plan, args.device, args.ray_cpus)
    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    check_weights(plan, args.eval_clip_model, args.eval_clip_pretrained)
    check_writable(out)
    device = resolve_device(args.device or "auto")
    evaluator = Evaluator(args.eval_clip_model, args.eval_clip_pretrained, device)
    meta = {
        "command": command_line(args),
        "prompts": prompts, "methods": list(dict.fromkeys(e.method for e in plan)),
        "priors": {e.method: e.prior for e in plan},
        "seeds": parse_seeds(args.seeds), "steps": args.steps,
        "evaluator": [args.eval_clip_model, args.eval_clip_pretrained], "views": args.eval_views,
        "size": args.eval_size, "chance": 1.0 / len(prompts),
        "reference": spec.absolute(args.reference) if args.reference else None,
        "ray": cluster.describe() if cluster else None,
    }
    say = print if args.quiet else tqdm.write
    for note in dict.fromkeys(notes):
        say(f"bench: {note}")
    statuses, todo = pending(plan, say)
    progress = Progress(plan, statuses, args.quiet)
    try:
        if cluster is not None:
            cluster.train(plan, todo, progress, args.ray_cpus, out)
        else:
            train_serial(plan, todo, progress)
    except KeyboardInterrupt:
        progress.close()
        finished = sum(s["status"] == "done" for s in statuses.values())
        from threed.trainer import Interrupted

        raise Interrupted(f"interrupted: {finished} of {len(plan)} runs are finished and the interrupted ones kept "
                          f"their checkpoints; re-run the same command to continue") from None
    finally:
        progress.close()
        if cluster is not None:
            cluster.close()  # evaluation needs no cluster

    evals = evaluate_all(plan, evaluator, args.eval_views, args.eval_size, device, args.quiet)
    text_emb = evaluator.texts(prompts) if any(v is not None for v in evals.values()) else None
    rows, summary = collect(plan, statuses, evals, text_emb, evaluator, out)
    written = write_outputs(out, meta, rows, summary)
    print(f"bench: {len(plan)} runs in {time.perf_counter() - start:.0f} s; wrote "
          f"{', '.join(str(p) for p in written)} and the runs in {out / 'runs'}", flush=True)
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} runs did not finish ({', '.join(sorted({r['status'] for r in failed}))}; "
                        f"see {out / 'report.md'}); re-run the same command to retry them")
