"""What the bench writes from its results: results.csv, results.json, the PNG plots, report.md, and
report.html (threed/report.py)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from threed.bench.plan import method_label
from threed.io import atomic_path, atomic_write_text


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


def row_budget(row: dict) -> dict[str, int]:
    """A results row's budget as {stage: steps, ..., "total": steps} (its budget_* columns)."""
    prefix = "budget_"
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and v != ""}


def budget_text(budget: dict[str, int]) -> str:
    """The budget in words: "1000 steps", or for several stages "6000 steps (nerf 1000 + mesh 5000)"."""
    stages = [f"{stage} {steps}" for stage, steps in budget.items() if stage != "total"]
    return f"{budget['total']} steps" + (f" ({' + '.join(stages)})" if len(stages) > 1 else "")


def write_plots(out: Path, rows: list[dict], summary: list[dict], chance: float | None) -> list[str]:
    """r_precision.png (reference_view.png for an image bench, `chance` None), time.png, quality_vs_time.png
    (matplotlib, headless)."""
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

    labels = [method_label(s["method"], s["prior"]) for s in summary]
    images = chance is None
    if images:  # the reference view against the input image, one point per run
        fig, axes = plt.subplots(1, 3, figsize=(max(7, 1.5 * len(methods) + 5), 3.2))
        for ax, (key, name) in zip(axes, (("reference_psnr", "PSNR (dB)"), ("reference_ssim", "SSIM"),
                                          ("reference_mask_iou", "mask IoU"))):
            for i, m in enumerate(methods):
                vals = [float(r[key]) for r in rows if r["method"] == m and r.get(key) not in (None, "")]
                ax.scatter([i] * len(vals), vals, s=25)
            ax.set_xticks(x, labels)
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.set_title(f"reference view: {name}", fontsize=9)
        save(fig, "reference_view.png")
    else:
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(methods) + 2), 3.2))
        for j, (short, label) in enumerate((("color", "colour"), ("textureless", "textureless"))):
            vals = [np.nan_to_num(s[f"r_at_1_{short}"], nan=0.0) for s in summary]
            ax.bar(x + (j - 0.5) * 0.38, vals, width=0.38, label=label)
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
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
    quality = "reference_psnr" if images else "clip_sim_color"
    for m, label in zip(methods, labels):
        pts = [(float(r["wall_time_s"]), float(r[quality])) for r in rows
               if r["method"] == m and r["wall_time_s"] != "" and r.get(quality) not in (None, "")]
        if pts:
            ax.scatter(*zip(*pts), label=label, s=30)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("reference view PSNR (dB)" if images else "evaluator CLIP similarity to own prompt")
    ax.set_title("Quality against time (one point per run)")
    if any(r.get(quality) not in (None, "") for r in rows):
        ax.legend(fontsize=8)
    save(fig, "quality_vs_time.png")
    return written


Column = tuple[str, Callable[[dict], str]]  # a report table's header and how a row's cell reads


def _table(columns: list[Column], items: list[dict]) -> list[str]:
    """A markdown table of `items`, one row each."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(item) for _, cell in columns) + " |" for item in items]


def _summary_columns(own: list[Column], summary: list[dict]) -> list[Column]:
    """The summary table's columns: the method and its finished runs, the bench's own scores, then time,
    speed, memory and the mesh, and the distances to a reference where the runs have one."""
    columns: list[Column] = [("method", lambda s: method_label(s["method"], s["prior"])),
                             ("runs done", lambda s: f"{s['finished']}/{s['runs']}"), *own,
                             ("time (s)", lambda s: _fmt(s["mean_wall_time_s"])),
                             ("it/s", lambda s: _fmt(s["mean_it_per_s"])),
                             ("peak mem (MB)", lambda s: _fmt(s["max_peak_memory_mb"])),
                             ("faces", lambda s: _fmt(s["mean_faces"], 0)),
                             ("watertight", lambda s: _fmt(s["watertight_fraction"], 2))]
    if any("mean_chamfer_l1" in s for s in summary):
        columns += [("Chamfer-L1", lambda s: _fmt(s.get("mean_chamfer_l1"), 4)),
                    ("F-score@1%", lambda s: _fmt(s.get("mean_fscore_1pct"))),
                    ("normal consistency", lambda s: _fmt(s.get("mean_normal_consistency"), 4))]
    return columns


def _run_columns(subject: str, own: list[Column]) -> list[Column]:
    """The runs table's columns: the method, the run's `subject` (prompt or image), seed, status and budget,
    the bench's own scores, then time, speed, the mesh and the preview."""
    def status(r: dict) -> str:
        return (r["status"] + (f": {r['error']}" if r["error"] else "")).replace("|", "/")

    return [("method", lambda r: method_label(r["method"], r["prior"])),
            (subject, lambda r: r[subject].replace("|", "/")), ("seed", lambda r: str(r["seed"])),
            ("status", status), ("budget", lambda r: budget_text(row_budget(r))), *own,
            ("time (s)", lambda r: _fmt(r["wall_time_s"])), ("it/s", lambda r: _fmt(r["it_per_s"])),
            ("faces", lambda r: _fmt(r.get("faces"))), ("watertight", lambda r: _fmt(r.get("watertight"))),
            ("preview", lambda r: f"![]({r['thumbnail']})" if r["thumbnail"] else "")]


def write_image_report(out: Path, meta: dict, rows: list[dict], summary: list[dict], plots: list[str]) -> None:
    """report.md of an image bench (--images): each result's reference view against its input image."""
    budgets = "; ".join(f"{label} {budget_text(b)}" for label, b in meta["budget"].items())
    lines = [
        "# threed benchmark (image-to-3D)", "",
        f"Command: `{meta['command']}`", "",
        f"{len(meta['images'])} images × {len(meta['methods'])} methods × {len(meta['seeds'])} seeds. Budget per run "
        f"(`--steps` is each method's first stage): {budgets}. Each result is scored by the render from its "
        f"reference camera against its input image (PSNR, SSIM of the colour over the render's background; IoU "
        f"of opacity and alpha, each > 0.5), as the run measured it at its end.", "",
        "## Summary", "",
    ]
    lines += _table(_summary_columns([("PSNR (dB)", lambda s: _fmt(s.get("mean_reference_psnr"), 2)),
                                      ("SSIM", lambda s: _fmt(s.get("mean_reference_ssim"))),
                                      ("mask IoU", lambda s: _fmt(s.get("mean_reference_mask_iou")))], summary), summary)
    lines += ["", "PSNR, SSIM, mask IoU: means over a method's finished runs. Time: training steps only, per run, "
              "summed over resumed segments. Peak memory: of the run's own process.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Runs", ""]
    lines += _table(_run_columns("image", [("PSNR (dB)", lambda r: _fmt(r.get("reference_psnr"), 2)),
                                           ("SSIM", lambda r: _fmt(r.get("reference_ssim"))),
                                           ("mask IoU", lambda r: _fmt(r.get("reference_mask_iou")))]), rows)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def write_report(out: Path, meta: dict, rows: list[dict], summary: list[dict], plots: list[str]) -> None:
    if meta.get("images"):
        return write_image_report(out, meta, rows, summary, plots)
    ev = meta["evaluator"]
    budgets = "; ".join(f"{label} {budget_text(b)}" for label, b in meta["budget"].items())
    lines = [
        "# threed benchmark", "",
        f"Command: `{meta['command']}`", "",
        f"{len(meta['prompts'])} prompts × {len(meta['methods'])} methods × {len(meta['seeds'])} seeds. Budget per "
        f"run (`--steps` is each method's first stage): {budgets}. Evaluator CLIP: {ev[0]} ({ev[1]}), "
        f"{meta['views']} views of {meta['size']} px per result, colour (albedo) and textureless. R@1 chance level: "
        f"{meta['chance']:.3f}.", "",
        "## Summary", "",
    ]
    mark = lambda s: " (inflated)" if s["inflated"] else ""  # noqa: E731
    lines += _table(_summary_columns([("R@1 colour", lambda s: _fmt(s["r_at_1_color"]) + mark(s)),
                                      ("R@1 textureless", lambda s: _fmt(s["r_at_1_textureless"]) + mark(s)),
                                      ("CLIP sim", lambda s: _fmt(s["mean_clip_sim_color"]))], summary), summary)
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
    lines += ["## Runs", ""]
    lines += _table(_run_columns("prompt", [("rank colour", lambda r: _rank(r.get("rank_color"))),
                                            ("rank textureless", lambda r: _rank(r.get("rank_textureless"))),
                                            ("CLIP sim", lambda r: _fmt(r.get("clip_sim_color")))]), rows)
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

