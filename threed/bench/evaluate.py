"""Scoring one finished run the same way for every method: K views rendered in colour and textureless,
embedded by the evaluator CLIP (not in an image bench, whose results are scored by their reference view: the
run's closing record), and the mesh's faces, watertightness and (with a reference) distance to it.
An evaluation is cached in DIR/evals/, keyed by the run's closing record and the evaluator, so a re-run
evaluates only what changed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from threed.bench.plan import Entry, as_evaluator_error
from threed.bench.progress import say
from threed.errors import UserError
from threed.io import atomic_write_bytes, atomic_write_text
from threed.rundir import FINAL_MESH, RunDir

SHADINGS = ("albedo", "textureless")
DISTANCE_KEYS = ("chamfer_l1", "chamfer_l1_rel", "fscore_1pct", "fscore_2pct",
                 "normal_consistency")  # threed.metrics.mesh_distance


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
                raise as_evaluator_error(e) from None
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
    """Face count and watertightness of the run's mesh, and its distance and normal consistency to
    `reference` if given (threed.metrics.mesh_distance)."""
    import trimesh

    path = RunDir(run_dir).mesh_file(FINAL_MESH)
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


def eval_key(entry: Entry, evaluator: Evaluator | None, views: int, size: int, done: dict) -> dict:
    """What an evaluation depends on: a change in any of these re-evaluates the run."""
    return {"evaluator": [evaluator.name, evaluator.pretrained] if evaluator else None, "views": views, "size": size,
            "run": {k: done.get(k) for k in ("step", "wall_time_s")},
            # an evaluation cached before a distance was added is redone, so every row has every column
            **({"distances": list(DISTANCE_KEYS)} if entry.prior == "oracle" else {})}


def cached_evaluation(entry: Entry, key: dict) -> dict | None:
    if entry.eval_path.exists() and entry.thumb_path.exists():
        try:
            cached = json.loads(entry.eval_path.read_text())
            if cached.get("key") == key:
                return cached
        except json.JSONDecodeError:
            pass
    return None


def evaluate(entry: Entry, evaluator: Evaluator | None, views: int, size: int, device: str,
             step: Callable[[str, int], None] | None = None) -> dict:
    """Render, embed and measure one finished run, and write its thumbnail and cached evaluation.
    `step(what, views_done)` reports progress."""
    from threed import pipeline

    step = step or (lambda what, n: None)
    done = RunDir(entry.run_dir).closing_record() or {}
    step("loading", 0)
    trainer = pipeline.load_trainer(entry.run_dir, device)
    renders = {}
    for s in SHADINGS:
        step(f"rendering {s}", 0)
        renders[s] = pipeline.render_views(entry.run_dir, views, s, size, device, trainer=trainer)
        step(f"rendered {s}", views)
    result: dict[str, Any] = {"key": eval_key(entry, evaluator, views, size, done), "done": done}
    if evaluator is not None:
        step("embedding", 0)
        for s in SHADINGS:
            result[f"emb_{s}"] = evaluator.images(renders[s]).round(6).tolist()
    step("mesh statistics", 0)
    reference = entry.cfg.guidance.oracle.reference if entry.prior == "oracle" else None
    result.update(mesh_stats(entry.run_dir, reference))
    write_thumbnail(entry.thumb_path, renders)
    atomic_write_text(entry.eval_path, json.dumps(result))
    return result


def evaluate_all(plan: list[Entry], evaluator: Evaluator | None, views: int, size: int, device: str,
                 quiet: bool) -> dict[str, dict | None]:
    """Every finished entry's evaluation: cached ones as they are, the others computed with a progress bar
    counted in rendered views."""
    evals: dict[str, dict | None] = {}
    todo = []
    for entry in plan:
        done = RunDir(entry.run_dir).closing_record()
        if done is None:
            evals[entry.name] = None
            continue
        evals[entry.name] = cached_evaluation(entry, eval_key(entry, evaluator, views, size, done))
        if evals[entry.name] is None:
            todo.append(entry)
    if not todo:
        return evals
    scorer = (f"with the evaluator CLIP {evaluator.name} ({evaluator.pretrained})" if evaluator is not None
              else "for thumbnails and mesh statistics")
    say(f"bench: evaluating {len(todo)} runs ({views} views x {len(SHADINGS)} shadings of {size} px each) {scorer} "
        f"on {device}", quiet)
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

