"""The bench's results: one row per run (its status, budget, closing record and scores) and one summary row
per method (CLIP R-precision over its finished runs, means), as the writers (threed/bench/writers.py) and
report.html (threed/report.py) show them. An image bench (--images) has no R-precision: each result is scored
by its reference view against its input image (REFERENCE_KEYS, which the run's closing record holds:
threed/scenes/reference.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from threed.bench.evaluate import DISTANCE_KEYS, SHADINGS, Evaluator
from threed.bench.plan import Entry
from threed.config import Config
from threed.metrics import REPORTED
from threed.rundir import RunDir

# The reference view against the input image (image-to-3D): PSNR (dB), SSIM, and the IoU of opacity and alpha.
REFERENCE_KEYS = ("reference_psnr", "reference_ssim", "reference_mask_iou")


def bench_stages(plan: list[Entry]) -> list[str]:
    """Every stage some entry trains, in stage order: one budget column each."""
    return list(dict.fromkeys(stage for e in plan for stage, _ in e.budget))


def budget_columns(entry: Entry, stages: list[str]) -> dict[str, Any]:
    """budget_<stage>: the steps the entry's plan gives each stage of the bench ("" for a stage its method
    does not have); budget_total: their sum. The same columns in every row, so the CSV's stay in order."""
    own = dict(entry.budget)
    return {**{f"budget_{stage}": own.get(stage, "") for stage in stages}, "budget_total": entry.total_steps}


def method_budgets(plan: list[Entry]) -> dict[str, dict[str, int]]:
    """Each method's budget per run, {label: {stage: steps, ..., "total": steps}} (results.json's meta):
    a method's entries differ only in prompt and seed, which change no step count."""
    out: dict[str, dict[str, int]] = {}
    for e in plan:
        out.setdefault(e.label, {**dict(e.budget), "total": e.total_steps})
    return out


def guidance_clips(cfg: Config) -> set[tuple[str, str]]:
    from threed.clip_models import canonical_id

    if cfg.guidance.type != "clip":
        return set()
    return {canonical_id(n, p) for n, p in zip(cfg.guidance.clip.models, cfg.guidance.clip.pretrained)}


def collect(plan: list[Entry], statuses: dict[str, dict], evals: dict[str, dict | None],
            text_emb: np.ndarray | None, evaluator: Evaluator | None, out: Path) -> tuple[list[dict], list[dict]]:
    """Per-run rows and per-method summary rows (R-precision over each method's finished runs; for an image
    bench, `evaluator` None, the reference view's scores instead)."""
    import torch

    from threed.clip_models import canonical_id
    from threed.r_precision import prompt_ranks, prompt_similarity, r_precision

    eval_id = canonical_id(evaluator.name, evaluator.pretrained) if evaluator is not None else None
    images = any(e.image for e in plan)
    stages = bench_stages(plan)
    rows = []
    for e in plan:
        ev = evals.get(e.name)
        # the run's latest record (a cached evaluation may hold an older one)
        done = RunDir(e.run_dir).closing_record() or {}
        row: dict[str, Any] = {
            "method": e.method, "prior": e.prior, **({"image": e.subject} if e.image else {"prompt": e.prompt}),
            "seed": e.seed,
            "status": statuses.get(e.name, {}).get("status", "missing"),
            "steps": done.get("step", ""), **budget_columns(e, stages), "wall_time_s": done.get("wall_time_s", ""),
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
        if images:
            row.update({k: done[k] for k in REFERENCE_KEYS if k in done})
        if ev is not None:
            row["faces"], row["watertight"] = ev["faces"], ev["watertight"]
            for k in DISTANCE_KEYS:
                if k in ev:
                    row[k] = ev[k]
            row.update(earlier_stage_distances(e, done))
        row["run_dir"] = str(e.run_dir.relative_to(out)) if e.run_dir.is_relative_to(out) else str(e.run_dir)
        row["thumbnail"] = str(e.thumb_path.relative_to(out)) if e.thumb_path.exists() else ""
        row["error"] = statuses.get(e.name, {}).get("error", "")
        rows.append(row)

    summary = []
    for method in dict.fromkeys(e.method for e in plan):  # one prior per method in a bench
        entries = [e for e in plan if e.method == method]
        scored = [e for e in entries if evals.get(e.name) is not None]
        inflated = eval_id is not None and any(eval_id in guidance_clips(e.cfg) for e in entries)
        mrows = [r for r in rows if r["method"] == method and r["status"] == "done"]
        s: dict[str, Any] = {"method": method, "prior": entries[0].prior, "runs": len(entries),
                             "finished": len(scored), "inflated": inflated}
        for shading, short in zip(SHADINGS, ("color", "textureless")):
            if images:
                continue
            if scored and text_emb is not None:
                emb = torch.tensor([evals[e.name][f"emb_{shading}"] for e in scored], dtype=torch.float32)
                truth = torch.tensor([e.prompt_index for e in scored])
                s[f"r_at_1_{short}"] = round(r_precision(emb, torch.from_numpy(text_emb), truth, k=1), 4)
            else:
                s[f"r_at_1_{short}"] = float("nan")
        if images:
            for k in REFERENCE_KEYS:
                s[f"mean_{k}"] = _mean([r.get(k) for r in mrows])
        else:
            s["mean_clip_sim_color"] = _mean([r.get("clip_sim_color") for r in mrows])
        s["mean_wall_time_s"] = _mean([r["wall_time_s"] for r in mrows])
        s["mean_it_per_s"] = _mean([r["it_per_s"] for r in mrows])
        s["max_peak_memory_mb"] = max([r["peak_memory_mb"] for r in mrows if r["peak_memory_mb"] != ""], default=float("nan"))
        s["mean_faces"] = _mean([r.get("faces") for r in mrows])
        s["watertight_fraction"] = _mean([float(r["watertight"]) for r in mrows if "watertight" in r])
        for k in ("chamfer_l1", "fscore_1pct", "normal_consistency"):
            vals = [r.get(k) for r in mrows if k in r]
            if vals:
                s[f"mean_{k}"] = _mean(vals)
        summary.append(s)
    return rows, summary


def earlier_stage_distances(entry: Entry, done: dict) -> dict[str, Any]:
    """`<stage>_chamfer_l1`, ... of each stage before the last (its kept mesh-<stage>.*), as the run's closing
    record measured them against the oracle's reference (threed.metrics.reference_metrics); the final mesh's
    are the bench's own columns. Empty for one stage or a run that measured none."""
    stages = [stage for stage, _ in entry.budget][:-1]
    return {f"{stage}_{k}": done[f"{stage}_{k}"] for stage in stages for k in REPORTED if f"{stage}_{k}" in done}


def _mean(values: list) -> float:
    vals = [float(v) for v in values if v not in (None, "") and not (isinstance(v, float) and math.isnan(v))]
    return round(sum(vals) / len(vals), 4) if vals else float("nan")
