"""`threed bench`: every (prompt, method, seed) with one step budget, scored the same way.

Each entry trains in its own run directory, DIR/runs/<method>/<prompt-slug>-s<seed>/, through the same
`pipeline.run` as `threed run`. Then each finished run is rendered from K evenly spaced views (colour and
textureless) and embedded by an evaluator CLIP; CLIP R-precision (DreamFusion) asks, per method, how
often a result's own prompt ranks first among all prompts of the benchmark. Alongside: training time,
it/s, peak memory, mesh faces and watertightness, and with --reference, Chamfer-L1 and F-score for
methods whose prior sees the reference (oracle).

Everything is resumable: a run whose metrics.jsonl holds its "done" record is not retrained, an
evaluation is cached in DIR/evals/ keyed by the run's final record and the evaluator, and every file is
written atomically, so a crash or Ctrl-C loses at most the entry in progress.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from threed.config import Config, build_config, to_dict, validate
from threed.errors import UserError
from threed.io import atomic_path, atomic_write_bytes, atomic_write_text

# bench method -> (threed method, its default preset, the guidance type it forces or None)
METHODS: dict[str, tuple[str, str, str]] = {
    "sds": ("dreamfusion", "dreamfusion-sd", "stable_diffusion"),
    "clip": ("clip", "clip", "clip"),
    "oracle": ("dreamfusion", "oracle", "oracle"),
}
ALIASES = {"dreamfusion": "sds"}
SHADINGS = ("albedo", "textureless")
DISTANCE_KEYS = ("chamfer_l1", "chamfer_l1_rel", "fscore_1pct", "fscore_2pct")  # threed.metrics.mesh_distance
DEFAULT_EVAL_CLIP = ("ViT-B-16", "openai")  # differs from the default guidance CLIP (ViT-B-32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line (# starts a comment)")
    p.add_argument("--methods", default="sds,clip", help="comma-separated: sds, clip, oracle [sds,clip]")
    p.add_argument("--steps", type=int, required=True, help="optimisation steps for every run (the budget)")
    p.add_argument("--out", required=True, metavar="DIR", help="benchmark folder (runs, results, report)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds [0]")
    p.add_argument("--preset", action="append", default=[], metavar="[METHOD=]PRESET",
                   help="preset for every method, or METHOD=PRESET for one (repeatable) "
                        "[sds: dreamfusion-sd, clip: clip, oracle: oracle]")
    p.add_argument("--eval-clip-model", dest="eval_clip_model", default=DEFAULT_EVAL_CLIP[0],
                   help=f"evaluator CLIP architecture (open_clip name) [{DEFAULT_EVAL_CLIP[0]}]")
    p.add_argument("--eval-clip-pretrained", dest="eval_clip_pretrained", default=DEFAULT_EVAL_CLIP[1],
                   help=f"evaluator weights: tag | checkpoint path | none [{DEFAULT_EVAL_CLIP[1]}]")
    p.add_argument("--eval-views", dest="eval_views", type=int, default=8, help="views per result (K) [8]")
    p.add_argument("--eval-size", dest="eval_size", type=int, default=224, help="render size of those views [224]")
    p.add_argument("--reference", metavar="MESH", help="reference mesh: the oracle's target, scored by Chamfer/F-score")
    p.add_argument("--device", help="cpu or cuda [cuda if available]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- the plan ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    method: str
    prompt: str
    prompt_index: int
    seed: int
    cfg: Config
    run_dir: Path
    eval_path: Path
    thumb_path: Path

    @property
    def name(self) -> str:
        return f"{self.method}/{self.run_dir.name}"


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


def parse_methods(text: str) -> list[str]:
    methods = []
    for name in (m.strip() for m in text.split(",")):
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in METHODS:
            raise UserError(f"unknown method '{name}' in --methods: choose from {', '.join(METHODS)}")
        if name not in methods:
            methods.append(name)
    if not methods:
        raise UserError("--methods is empty: pass e.g. --methods sds,clip")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"bad --seeds '{text}': write integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds is empty: pass e.g. --seeds 0,1")
    return list(dict.fromkeys(seeds))


def parse_presets(items: list[str], methods: list[str]) -> dict[str, str]:
    presets = {m: METHODS[m][1] for m in methods}
    for item in items:
        if "=" in item:
            method, preset = (s.strip() for s in item.split("=", 1))
            method = ALIASES.get(method, method)
            if method not in METHODS:
                raise UserError(f"unknown method '{method}' in --preset {item}: choose from {', '.join(METHODS)}")
            if method in presets:
                presets[method] = preset
        else:
            presets = {m: item.strip() for m in methods}
    return presets


def slugify(prompt: str) -> str:
    """Readable and collision-free: the prompt's words, cut to 48 characters, plus a short hash."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "prompt"
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def entry_config(method: str, preset: str, overrides: list[str], prompt: str, seed: int, steps: int,
                 reference: str | None, device: str | None) -> Config:
    """The preset and overrides, with the bench's prompt, seed and budget, and the method's prior forced."""
    threed_method, _, guidance_type = METHODS[method]
    cfg = build_config(preset, [*overrides, f"method={threed_method}", f"guidance.type={guidance_type}"])
    cfg.prompt, cfg.seed, cfg.steps = prompt, seed, steps
    if device:
        cfg.device = device
    if guidance_type == "oracle":
        if not reference and not cfg.guidance.oracle.reference:
            raise UserError("method oracle needs a reference mesh: pass --reference MESH")
        if reference:
            cfg.guidance.oracle.reference = str(Path(reference).expanduser().resolve())
    validate(cfg)
    return cfg


def make_plan(args: argparse.Namespace) -> list[Entry]:
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
    out = Path(args.out)
    overrides = list(getattr(args, "overrides", None) or [])
    plan = []
    for method in methods:
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                cfg = entry_config(method, presets[method], overrides, prompt, seed, args.steps, args.reference,
                                   args.device)
                stem = f"{slugify(prompt)}-s{seed}"
                plan.append(Entry(method, prompt, i, seed, cfg, out / "runs" / method / stem,
                                  out / "evals" / method / f"{stem}.json", out / "thumbs" / method / f"{stem}.png"))
    return plan


def check_weights(plan: list[Entry], eval_model: str, eval_pretrained: str) -> None:
    """Every model the benchmark will need is on disk (or downloadable) before hours of training start."""
    from threed.clip_models import resolve_pretrained as resolve_clip
    from threed.guidance.models import resolve_pretrained as resolve_sd

    resolve_clip(eval_model, eval_pretrained)
    checked: set[tuple[str, str]] = set()
    for e in plan:
        g = e.cfg.guidance
        needs = list(zip(g.clip.models, g.clip.pretrained)) if g.type == "clip" else []
        if g.type == "stable_diffusion":
            needs.append(("sd", g.sd.model))
        for pair in needs:
            if pair in checked:
                continue
            checked.add(pair)
            if pair[0] == "sd":
                resolve_sd(pair[1])
            else:
                resolve_clip(*pair)


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


def check_same_run(entry: Entry) -> None:
    """A run directory from an earlier bench must have been made with the same config."""
    from threed.config import load_yaml

    saved_path = entry.run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved, wanted = _flatten(load_yaml(saved_path)), _flatten(to_dict(entry.cfg))
    ignored = {"device"}  # where it runs does not change what it computes
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k) and k not in ignored)
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:3])
        raise UserError(f"{entry.run_dir} was made with other settings ({shown}); re-run with the same options "
                        f"or pass another --out")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def train(entry: Entry, index: int, total: int, quiet: bool) -> dict:
    """Train the entry unless it is done; returns {"status": done|failed|diverged, "error": ...}."""
    from threed import pipeline
    from threed.trainer import Diverged, Interrupted, list_checkpoints

    tag = f"bench: [{index}/{total}] {entry.method} '{entry.prompt}' seed {entry.seed}"
    check_same_run(entry)
    if final_record(entry.run_dir) is not None:
        print(f"{tag}: done already, skipped", flush=True)
        return {"status": "done", "error": ""}
    resume = bool(list_checkpoints(entry.run_dir))
    print(f"{tag}: {'resuming' if resume else 'training'} in {entry.run_dir}", flush=True)
    try:
        pipeline.run(entry.cfg, entry.run_dir, resume=resume, progress=not quiet)
    except Interrupted as e:
        raise Interrupted(f"{e}; or re-run the same `threed bench` command to continue the whole benchmark") from None
    except Diverged as e:
        print(f"{tag}: diverged: {e}", file=sys.stderr, flush=True)
        return {"status": "diverged", "error": str(e)}
    except UserError:
        raise
    except Exception as e:  # e.g. CUDA out of memory: a result of this entry, not of the benchmark
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{tag}: failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        return {"status": "failed", "error": f"{type(e).__name__}: {first}"}
    return {"status": "done", "error": ""}


# -- evaluation -----------------------------------------------------------------------------------

class Evaluator:
    """The evaluator CLIP, loaded on first use."""

    def __init__(self, name: str, pretrained: str, device: str):
        self.name, self.pretrained, self.device = name, pretrained, device
        self._loaded: tuple | None = None

    def load(self) -> tuple:
        if self._loaded is None:
            from threed.clip_models import load_clip

            self._loaded = load_clip(self.name, self.pretrained, self.device)
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


def evaluate(entry: Entry, evaluator: Evaluator, views: int, size: int, reference: str | None,
             device: str) -> dict | None:
    """The entry's cached evaluation, computed (renders, embeddings, mesh stats, thumbnail) if missing."""
    from threed import pipeline

    done = final_record(entry.run_dir)
    if done is None:
        return None
    key = eval_key(entry, evaluator, views, size, done)
    if entry.eval_path.exists() and entry.thumb_path.exists():
        try:
            cached = json.loads(entry.eval_path.read_text())
            if cached.get("key") == key:
                return cached
        except json.JSONDecodeError:
            pass
    print(f"bench: evaluating {entry.name}", flush=True)
    trainer = pipeline.load_trainer(entry.run_dir, device)
    renders = {s: pipeline.render_views(entry.run_dir, views, s, size, device, trainer=trainer) for s in SHADINGS}
    result: dict[str, Any] = {"key": key, "done": done}
    for s in SHADINGS:
        result[f"emb_{s}"] = evaluator.images(renders[s]).round(6).tolist()
    result.update(mesh_stats(entry.run_dir, reference if entry.cfg.guidance.type == "oracle" else None))
    write_thumbnail(entry.thumb_path, renders)
    atomic_write_text(entry.eval_path, json.dumps(result))
    return result


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
        done = (ev or {}).get("done") or final_record(e.run_dir) or {}
        row: dict[str, Any] = {
            "method": e.method, "prompt": e.prompt, "seed": e.seed,
            "status": statuses.get(e.name, {}).get("status", "missing"),
            "steps": done.get("step", ""), "wall_time_s": done.get("wall_time_s", ""),
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
    for method in dict.fromkeys(e.method for e in plan):
        entries = [e for e in plan if e.method == method]
        scored = [e for e in entries if evals.get(e.name) is not None]
        inflated = any(eval_id in guidance_clips(e.cfg) for e in entries)
        mrows = [r for r in rows if r["method"] == method and r["status"] == "done"]
        s: dict[str, Any] = {"method": method, "runs": len(entries), "finished": len(scored), "inflated": inflated}
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
    ax.set_xticks(x, [m + (" *" if s["inflated"] else "") for m, s in zip(methods, summary)])
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
    ax.set_xticks(x, methods)
    ax.set_ylabel("training time per run (s)")
    ax.set_title("Time per method (mean, min-max)")
    save(fig, "time.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m in methods:
        pts = [(float(r["wall_time_s"]), float(r["clip_sim_color"])) for r in rows
               if r["method"] == m and r["wall_time_s"] != "" and r.get("clip_sim_color") is not None]
        if pts:
            ax.scatter(*zip(*pts), label=m, s=30)
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
        line = (f"| {s['method']} | {s['finished']}/{s['runs']} | {_fmt(s['r_at_1_color'])}{mark} | "
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
              "(colour). Time: training steps only, per run. Peak memory: GPU memory allocated on CUDA, else the "
              "process's peak resident memory. Watertight: fraction of meshes that are closed manifolds.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Runs", "", "| method | prompt | seed | status | rank colour | rank textureless | CLIP sim | time (s) "
              "| it/s | faces | watertight | preview |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thumb = f"![]({r['thumbnail']})" if r["thumbnail"] else ""
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        lines.append(f"| {r['method']} | {r['prompt'].replace('|', '/')} | {r['seed']} | {status.replace('|', '/')} | "
                     f"{_rank(r.get('rank_color'))} | {_rank(r.get('rank_textureless'))} | "
                     f"{_fmt(r.get('clip_sim_color'))} | {_fmt(r['wall_time_s'])} | {_fmt(r['it_per_s'])} | "
                     f"{_fmt(r.get('faces'))} | {_fmt(r.get('watertight'))} | {thumb} |")
    lines += ["", "Rank: position of the run's own prompt among all prompts (1 = retrieved)."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# -- the command ----------------------------------------------------------------------------------

def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces (and resumes) this benchmark."""
    import shlex

    parts = ["threed", "bench", "--prompts", args.prompts, "--methods", args.methods, "--steps", str(args.steps),
             "--out", str(args.out), "--seeds", args.seeds]
    for item in args.preset:
        parts += ["--preset", item]
    parts += ["--eval-clip-model", args.eval_clip_model, "--eval-clip-pretrained", args.eval_clip_pretrained,
              "--eval-views", str(args.eval_views), "--eval-size", str(args.eval_size)]
    for opt in ("reference", "device"):
        if getattr(args, opt):
            parts += [f"--{opt}", getattr(args, opt)]
    parts += list(getattr(args, "overrides", None) or [])
    return " ".join(shlex.quote(str(p)) for p in parts)


def main(args: argparse.Namespace) -> None:
    from threed.config import resolve_device

    start = time.perf_counter()
    plan = make_plan(args)
    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    check_weights(plan, args.eval_clip_model, args.eval_clip_pretrained)
    from threed.pipeline import check_writable

    check_writable(out)
    device = resolve_device(args.device or "auto")
    evaluator = Evaluator(args.eval_clip_model, args.eval_clip_pretrained, device)
    meta = {
        "command": command_line(args),
        "prompts": prompts, "methods": list(dict.fromkeys(e.method for e in plan)),
        "seeds": parse_seeds(args.seeds), "steps": args.steps,
        "evaluator": [args.eval_clip_model, args.eval_clip_pretrained], "views": args.eval_views,
        "size": args.eval_size, "chance": 1.0 / len(prompts),
        "reference": str(Path(args.reference).resolve()) if args.reference else None,
    }

    statuses = {}
    for i, entry in enumerate(plan, 1):
        statuses[entry.name] = train(entry, i, len(plan), args.quiet)

    evals: dict[str, dict | None] = {}
    for entry in plan:
        if statuses[entry.name]["status"] == "done":
            evals[entry.name] = evaluate(entry, evaluator, args.eval_views, args.eval_size, args.reference, device)
    text_emb = evaluator.texts(prompts) if any(v is not None for v in evals.values()) else None

    rows, summary = collect(plan, statuses, evals, text_emb, evaluator, out)
    write_csv(out / "results.csv", rows)
    atomic_write_text(out / "results.json", json.dumps(_json_safe({"benchmark": meta, "summary": summary,
                                                                   "runs": rows}), indent=1))
    plots = write_plots(out, rows, summary, meta["chance"])
    write_report(out, meta, rows, summary, plots)
    from threed.report import write_bench_report

    page = write_bench_report(out, rows, summary, meta)
    print(f"bench: {len(plan)} runs in {time.perf_counter() - start:.0f} s; report: {out / 'report.md'}, {page}",
          flush=True)
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} runs did not finish ({', '.join(sorted({r['status'] for r in failed}))}; "
                        f"see {out / 'report.md'}); re-run the same command to retry them")
