"""`threed bench`: every (prompt, method, seed) with one budget, scored the same way.

The budget: `--steps` is what it is for `threed run`, the first (NeRF) stage's steps; a method with later
stages trains those too, each with its own step count (magic3d's mesh stage: `mesh.steps`, from its preset or
an override such as `magic3d:mesh.steps=1000`). results.csv / results.json record every stage's steps per run
(budget_<stage>, budget_total), and the progress bar counts every stage's steps of every entry.

Each entry's config comes from threed/spec.py, as for `threed run` (threed/bench/plan.py). Each entry trains
in a child process (threed/bench/child.py) in its own run directory,
DIR/runs/<method>[-<prior>]/<prompt-slug>-s<seed>/, so its peak memory is its own and a crash ends only that
entry; serially (threed/bench/train.py) or, with `--ray`, as Ray tasks (threed/bench/ray.py) running the same
child. Then each finished run is rendered from K evenly spaced views (colour and textureless) and embedded by
an evaluator CLIP (threed/bench/evaluate.py); CLIP R-precision (DreamFusion) asks, per method, how often a
result's own prompt ranks first among all prompts of the benchmark (threed/bench/results.py). Alongside:
training time, it/s, peak memory, mesh faces and watertightness, and with --reference, Chamfer-L1 and F-score
for methods whose prior sees the reference (oracle). threed/bench/writers.py writes the tables, plots and
reports.

`threed bench --images DIR` is the image-to-3D bench: every (image of DIR, image method, seed), zero123 by
default, with the same budget; no evaluator CLIP, as there are no prompts: each result is scored by its
reference view against its input image (PSNR, SSIM and mask IoU, from the run's closing record:
threed/scenes/reference.py), beside the same time, memory and mesh columns.

Everything is resumable: a run whose metrics.jsonl holds its "done" record is not retrained, an evaluation
is cached in DIR/evals/ keyed by the run's final record and the evaluator, and every file is written
atomically, so a crash or Ctrl-C loses at most the entries in progress (they keep their checkpoints).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from threed import methods as registry
from threed import spec
from threed.bench.evaluate import Evaluator, evaluate_all
from threed.bench.plan import (DEFAULT_METHODS, bench_inputs, check_weights, cuda_wanted, default_methods, make_plan,
                               parse_methods, parse_seeds)
from threed.bench.progress import Progress, say
from threed.bench.results import collect, method_budgets
from threed.bench.train import entry_task, pending, status_line, train_serial
from threed.bench.writers import write_outputs
from threed.errors import UserError

DEFAULT_EVAL_CLIP = ("ViT-B-16", "openai")  # differs from the default guidance CLIP (ViT-B-32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's own options; `threed run`'s model options are added by cli.py (shared definitions)."""
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--prompts", metavar="FILE", help="one prompt per line (# starts a comment)")
    inputs.add_argument("--images", metavar="DIR",
                        help="image-to-3D: a folder of input images, each scored by its reference view's PSNR, SSIM "
                             "and mask IoU")
    p.add_argument("--methods",
                   help=f"comma-separated: {', '.join(registry.names())} [{DEFAULT_METHODS}; with --images "
                        f"{registry.for_image().name}]")
    p.add_argument("--steps", type=int, required=True,
                   help="steps of every run's first stage, as for `threed run` (a method's later stages train "
                        "their own: magic3d's mesh stage mesh.steps)")
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


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces (and resumes) this benchmark."""
    import shlex

    source = ["--images", args.images] if getattr(args, "images", None) else ["--prompts", args.prompts]
    parts = ["threed", "bench", *source, "--methods", default_methods(args), "--steps", str(args.steps),
             "--out", str(args.out), "--seeds", args.seeds]
    for item in args.preset:
        parts += ["--preset", item]
    for name in spec.OPTIONS:
        if name not in ("prompt", "steps", "seed") and getattr(args, name, None) is not None:
            parts += [spec.flag(name), str(getattr(args, name))]
    if getattr(args, "guidance", None):
        parts += ["--guidance", args.guidance]
    if not getattr(args, "images", None):
        parts += ["--eval-clip-model", args.eval_clip_model, "--eval-clip-pretrained", args.eval_clip_pretrained]
    parts += ["--eval-views", str(args.eval_views), "--eval-size", str(args.eval_size)]
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
        from threed.bench import ray as bench_ray  # imports Ray: only when asked for

        bench_inputs(args)  # bad input fails before a cluster starts
        parse_methods(default_methods(args))
        cluster = bench_ray.connect(args.ray)
    try:
        run(args, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def run(args: argparse.Namespace, cluster=None) -> None:
    """The bench: plan, train (serially, or on `cluster`, a threed.bench.ray.Cluster), evaluate, write results."""
    from threed.config import resolve_device
    from threed.pipeline import check_writable

    start = time.perf_counter()
    plan, notes = make_plan(args, cuda=cuda_wanted(args.device, cluster.gpus if cluster else None))
    if cluster is not None:
        cluster.check(plan, args.device, args.ray_cpus)
    prompts, images = bench_inputs(args)
    out = Path(args.out)
    # an image bench is scored by each result's reference view against its input image: no evaluator CLIP
    clip = None if images else (args.eval_clip_model, args.eval_clip_pretrained)
    check_weights(plan, *(clip or (None, None)))
    check_writable(out)
    device = resolve_device(args.device or "auto")
    evaluator = Evaluator(*clip, device) if clip else None
    meta = {
        "command": command_line(args),
        "prompts": prompts, "images": [str(p) for p in images], "methods": list(dict.fromkeys(e.method for e in plan)),
        "priors": {e.method: e.prior for e in plan},
        "seeds": parse_seeds(args.seeds), "steps": args.steps, "budget": method_budgets(plan),
        "evaluator": list(clip) if clip else None, "views": args.eval_views,
        "size": args.eval_size, "chance": 1.0 / len(prompts) if prompts else None,
        "reference": spec.absolute(args.reference) if args.reference else None,
        "ray": cluster.describe() if cluster else None,
    }
    for note in dict.fromkeys(notes):
        say(f"bench: {note}", args.quiet)
    statuses, todo = pending(plan, lambda line: say(line, args.quiet))
    progress = Progress(plan, statuses, args.quiet)
    try:
        if cluster is not None:
            cluster.train(todo, progress, args.ray_cpus, out, task=entry_task,
                          line=lambda entry, status: status_line(entry, plan, status))
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
    text_emb = (evaluator.texts(prompts) if evaluator is not None and any(v is not None for v in evals.values())
                else None)
    rows, summary = collect(plan, statuses, evals, text_emb, evaluator, out)
    written = write_outputs(out, meta, rows, summary)
    print(f"bench: {len(plan)} runs in {time.perf_counter() - start:.0f} s; wrote "
          f"{', '.join(str(p) for p in written)} and the runs in {out / 'runs'}", flush=True)
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} runs did not finish ({', '.join(sorted({r['status'] for r in failed}))}; "
                        f"see {out / 'report.md'}); re-run the same command to retry them")
