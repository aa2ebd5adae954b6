"""report.html for a run or bench folder, and `threed view DIR` to serve one.

A report is a static page beside the files it shows, working offline: its scripts are copied into
report_files/ (our gallery.js and a pinned three.js build, threed/web/vendor/), never fetched from a CDN.
Browsers refuse ES modules and fetch() on pages opened from file://, so the scripts are classic ones and
a run's page embeds its mesh.glb (base64) up to EMBED_LIMIT; a bench page shows each run's 3D view
through that run's own page (report.html#viewer in an iframe). Served over HTTP (`threed view`) the same
pages fetch what they do not embed. A missing artifact is a placeholder that says how to make it.
"""

from __future__ import annotations

import base64
import errno
import html
import json
import math
import os
import re
import sys
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable

from threed.errors import UserError
from threed.io import atomic_write_bytes, atomic_write_text
from threed.rundir import RunDir

REPORT = "report.html"
ASSETS = "report_files"
WEB = Path(__file__).resolve().parent / "web"
# threed/web/<source> -> report_files/<name>
ASSET_FILES = {"gallery.js": "gallery.js", "gallery.css": "gallery.css", "vendor/three.min.js": "three.min.js",
               "vendor/LICENSE-three.txt": "LICENSE-three.txt"}
GENERATOR = "threed report 2"  # bumped when pages change, so a bench rewrites its runs' older pages
EMBED_LIMIT = 16 * 2**20  # bytes of mesh.glb embedded in a run page (base64 makes it 4/3 larger)
RUN_INPUTS = ("config.yaml", "metrics.jsonl", "mesh.glb", "mesh.json", "turntable.mp4", "preview.png",
              "gaussians.png")
BENCH_PLOTS = ("r_precision.png", "time.png", "quality_vs_time.png")  # threed.bench.writers.write_plots
VIEWER_BACKGROUND = "#e9ecef"
ENV_SIZE = (128, 64)  # texels (width, height) of the environment a PBR run's viewer is lit by


# -- small HTML helpers -----------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str | Path) -> str:
    """A relative URL for a relative path (each segment percent-encoded), escaped for an attribute."""
    return _esc(urllib.parse.quote(str(path).replace(os.sep, "/")))


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and not math.isfinite(value))


def _fmt(value: Any, digits: int = 3) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        text = f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text
    return str(value)


def _placeholder(text: str) -> str:
    return f'<div class="missing">{_esc(text)}</div>'


def _page(title: str, body: str, assets: str = ASSETS) -> str:
    a = _href(assets)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"generator\" content=\"{GENERATOR}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<link rel=\"icon\" href=\"data:,\">\n"  # no /favicon.ico request
        "<script>if (location.hash === \"#viewer\") document.documentElement.classList.add(\"embed\");</script>\n"
        f"<link rel=\"stylesheet\" href=\"{a}/gallery.css\">\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        f"<script src=\"{a}/three.min.js\"></script>\n<script src=\"{a}/gallery.js\"></script>\n</body>\n</html>\n"
    )


def copy_assets(folder: Path) -> None:
    """report_files/: the page's scripts, style and the three.js licence (rewritten only when changed)."""
    for source, name in ASSET_FILES.items():
        data = (WEB / source).read_bytes()
        target = folder / ASSETS / name
        if not target.exists() or target.read_bytes() != data:
            atomic_write_bytes(target, data)


def _assets_current(folder: Path) -> bool:
    return all((folder / ASSETS / name).exists() and (folder / ASSETS / name).stat().st_size ==
               (WEB / source).stat().st_size for source, name in ASSET_FILES.items())


# -- media (shared by run and bench pages) -------------------------------------------------------------

def _video(path: str | None, preload: str) -> str:
    """A muted looping turntable that plays while on screen; `preload` none keeps a long gallery light."""
    if path is None:
        return _placeholder("No turntable video (turntable.mp4): render one with `threed export DIR --video`.")
    return (f'<video src="{_href(path)}" data-what="turntable.mp4" controls muted loop playsinline '
            f'preload="{preload}" data-autoplay></video>')


def _preview(path: str | None, alt: str) -> str:
    if path is None:
        return _placeholder("No preview grid (preview.png): render one with `threed export DIR --video`.")
    return f'<img src="{_href(path)}" alt="{_esc(alt)}" data-what="the preview grid" loading="lazy">'


def _figure(content: str, caption: str, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<figure{attr}>{content}<figcaption>{caption}</figcaption></figure>"


# -- run pages --------------------------------------------------------------------------------------

def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = hi - lo
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * span:
        ticks.append(round(v, 12))
        v += step
    return ticks


def loss_curve_svg(records: list[dict], width: int = 640, height: int = 260, max_points: int = 800) -> str:
    """An inline SVG of every loss* value against step (log scale when positive and spanning > 30x);
    '' when fewer than two points were logged."""
    keys = [k for k in dict.fromkeys(k for r in records for k in r)
            if (k == "loss" or k.startswith("loss_"))]
    series: dict[str, list[tuple[float, float]]] = {}
    for k in keys:
        pts = [(float(r["step"]), float(r[k])) for r in records
               if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and math.isfinite(r[k])]
        if len(pts) >= 2:
            stride = math.ceil(len(pts) / max_points)
            series[k] = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    log = min(ys) > 0 and max(ys) / min(ys) > 30
    f = (lambda v: math.log10(v)) if log else (lambda v: v)  # noqa: E731
    y0, y1 = f(min(ys)), f(max(ys))
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - max(abs(y0) * 0.1, 1e-3), y1 + max(abs(y1) * 0.1, 1e-3)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 64, 12, 26, 34
    pw, ph = width - left - right, height - top - bottom
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: top + (1 - (f(y) - y0) / (y1 - y0)) * ph  # noqa: E731
    parts = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="loss against step"><title>loss against step</title>',
             f'<rect class="axis" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none"/>']
    if log:
        yticks = [10.0 ** k for k in range(math.ceil(y0), math.floor(y1) + 1)]
        if len(yticks) < 2:
            yticks = [10 ** t for t in _nice_ticks(y0, y1)]
    else:
        yticks = _nice_ticks(y0, y1)
    for v in yticks:
        y = sy(v)
        if top - 0.5 <= y <= top + ph + 0.5:
            parts.append(f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
                         f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for v in _nice_ticks(x0, x1):
        x = sx(v)
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{v:.0f}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 3}" text-anchor="middle">step</text>')
    colours = ("#2b6cb0", "#dd6b20", "#38a169", "#d53f8c", "#805ad5", "#718096", "#b7791f", "#319795")
    lx = left
    for i, (k, pts) in enumerate(series.items()):
        c = colours[i % len(colours)]
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="{1.6 if k == "loss" else 1.1}" points="{d}"/>')
        parts.append(f'<rect x="{lx}" y="8" width="10" height="10" fill="{c}"/>'
                     f'<text x="{lx + 14}" y="17">{_esc(k)}</text>')
        lx += 24 + 7 * len(k)
    if log:
        parts.append(f'<text x="{width - right}" y="17" text-anchor="end">log scale</text>')
    parts.append("</svg>")
    return "".join(parts)


def _load_config(run_dir: Path) -> tuple[str, dict]:
    path = RunDir(run_dir).config_path
    if not path.exists():
        return "", {}
    text = path.read_text(errors="replace")
    try:
        import yaml

        cfg = yaml.safe_load(text)
    except Exception:  # a damaged file is still shown as text
        cfg = None
    if not isinstance(cfg, dict):
        return text, {}
    from threed.config import migrate

    try:
        return text, migrate(cfg)  # a 0.1 run's renamed keys read as today's
    except (TypeError, ValueError):  # a renamed key with a damaged value: the facts that can be read
        return text, cfg


def _exists(run_dir: Path, name: str) -> bool:
    return (run_dir / name).is_file()


def _planned_steps(cfg: dict) -> Any:
    """Every stage's steps summed (a later stage continues the earlier one's step axis), or "?" for a config
    this version cannot read."""
    from threed import methods
    from threed.config import build_config

    try:
        config = build_config(base=cfg)
        return sum(steps for _, steps in methods.get(config.method).planned_steps(config))
    except UserError:
        return cfg.get("steps", "?")


def environment_texture(cfg: dict, size: tuple[int, int] = ENV_SIZE) -> bytes | None:
    """The environment a run's PBR material was made under (appearance.env_map times env_scale, as the
    appearance stage loads it, threed/render/ibl.py), for the viewer's image-based light: an equirectangular
    (width x height) RGBA image of little-endian half floats in three.js's layout (rows from the bottom,
    longitude from +x toward +z, where threed's maps start at -z). None when the run has no PBR stage or its
    environment file cannot be read now (the viewer then uses its own lights)."""
    appearance = cfg.get("appearance")
    if not isinstance(appearance, dict) or appearance.get("shading") != "pbr":
        return None
    import numpy as np

    from threed.render.ibl import load_environment, resize_latlong

    try:
        image = load_environment(str(appearance.get("env_map") or "") or None, float(appearance.get("env_scale", 2.0)))
    except (UserError, OSError, ValueError):
        return None
    width, height = size
    rgb = resize_latlong(image.float(), height, width).numpy()
    # threed: u = atan2(x, -z) / 2pi + 1/2, row 0 up; three.js: u = atan2(z, x) / 2pi + 1/2, row 0 down.
    # The same direction sits a quarter turn further along threed's longitude.
    rgb = np.roll(rgb[::-1], -width // 4, axis=1)
    rgba = np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=-1)
    return np.ascontiguousarray(rgba.astype("<f2")).tobytes()


def write_run_report(run_dir: Path | str) -> Path:
    """Write RUN_DIR/report.html (and report_files/) from what the run folder holds; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: pass the --out folder of a `threed run`")
    config_text, cfg = _load_config(run_dir)
    records, done = RunDir(run_dir).metrics()
    guidance = cfg.get("guidance") if isinstance(cfg.get("guidance"), dict) else {}
    prompt = str(cfg.get("prompt") or "")
    oracle = guidance.get("oracle") if isinstance(guidance.get("oracle"), dict) else {}
    image = cfg.get("image") if isinstance(cfg.get("image"), dict) else {}
    if not prompt and image.get("path"):
        prompt = f"image {Path(str(image['path'])).name}"
    if not prompt and oracle.get("reference"):
        prompt = f"reference {Path(str(oracle['reference'])).name}"
    title = prompt or run_dir.name
    steps_done = done["step"] if done else (records[-1]["step"] if records else 0)
    total = _planned_steps(cfg)
    facts = [f"method {cfg.get('method', '?')}", f"prior {guidance.get('type', '?')}", f"seed {cfg.get('seed', '?')}",
             f"step {steps_done} of {total}" + ("" if done else " (not finished)")]
    if done and done.get("device"):
        facts.append(f"device {done['device']}")

    body = [f"<h1>{_esc(title)}</h1>", f'<p class="meta">{_esc(" · ".join(facts))}</p>']

    glb = run_dir / "mesh.glb"
    embedded = ""
    caption = "mesh.glb: drag to orbit, scroll to zoom, right-drag to pan"
    if glb.is_file():
        embed = glb.stat().st_size <= EMBED_LIMIT
        environment = environment_texture(cfg)
        lit = ""
        if environment is not None:
            lit = f' data-env="env-data" data-env-size="{ENV_SIZE[0]} {ENV_SIZE[1]}"'
            caption += "; lit by the run's environment map"
        viewer = (f'<div class="viewer" data-glb="mesh.glb" data-background="{VIEWER_BACKGROUND}"'
                  + (' data-glb-inline="glb-data"' if embed else "") + lit
                  + '><div class="loading">Loading the 3D view…'
                  "</div><noscript>" + _placeholder("The 3D view needs JavaScript.") + "</noscript></div>")
        if embed:  # base64 holds no "<", so it cannot end the script element early
            embedded = ('<script type="application/octet-stream" id="glb-data">'
                        + base64.b64encode(glb.read_bytes()).decode("ascii") + "</script>")
        if environment is not None:
            embedded += ('<script type="application/octet-stream" id="env-data">'
                         + base64.b64encode(environment).decode("ascii") + "</script>")
    else:
        viewer = _placeholder("No 3D mesh (mesh.glb): export one with `threed export DIR --format glb`.")
    body.append('<div class="media">'
                + _figure(viewer, caption, "viewer-figure")
                + _figure(_video("turntable.mp4" if _exists(run_dir, "turntable.mp4") else None, "metadata"),
                          "turntable.mp4")
                + "</div>")
    body.append('<h2>Preview</h2><div class="preview">'
                + _preview("preview.png" if _exists(run_dir, "preview.png") else None, f"preview of {title}")
                + '</div><p class="note">' + ("Top row: the input image and the render from the reference camera; "
                                              "then colour and textureless renders from evenly spaced views.</p>"
                                              if image.get("path") else
                                              "Colour (top) and textureless (bottom) renders from evenly spaced "
                                              "views.</p>"))

    if _exists(run_dir, "gaussians.png"):  # a Gaussian-splatting run: the Gaussians the mesh was made from
        body.append('<h2>Gaussians</h2><div class="preview">'
                    + f'<img src="gaussians.png" alt="{_esc(f"the 3D Gaussians of {title}")}" '
                      'data-what="the Gaussians" loading="lazy">'
                    + '</div><p class="note">The 3D Gaussians the mesh was made from (gaussians.ply, which 3DGS '
                      "splat viewers open), rendered by threed's splat rasterizer from evenly spaced views.</p>")

    body.append("<h2>Final metrics</h2>")
    metrics: dict[str, Any] = {}
    if done:
        metrics.update({k: v for k, v in done.items() if k != "done"})
    else:
        body.append('<p class="note">The run has not finished: the values below are from its last logged step.</p>')
    # mesh.json describes each mesh file; show the one the viewer draws
    meshes = RunDir(run_dir).mesh_entries()
    shown = (meshes.get("mesh.glb") or next(iter(meshes.values()), None)) if meshes else None
    if isinstance(shown, dict):
        metrics.update({f"mesh {k}": v for k, v in shown.items()
                        if k in ("vertices", "faces", "threshold", "stage", "texture_size", "faces_before_decimation")})
    if records:
        metrics.update({k: v for k, v in records[-1].items() if k not in metrics and k != "time_s"})
    if metrics:
        body.append('<dl class="metrics">' + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(_fmt(v, 4))}</dd>"
                                                      for k, v in metrics.items()) + "</dl>")
    else:
        body.append(_placeholder("No metrics yet (metrics.jsonl is missing or empty)."))

    body.append("<h2>Loss</h2>")
    curve = loss_curve_svg(records)
    body.append(curve or _placeholder("No loss curve: metrics.jsonl has fewer than two logged steps."))

    body.append("<h2>Config</h2>")
    body.append(f"<pre>{_esc(config_text)}</pre>" if config_text else _placeholder("No config.yaml in this folder."))
    kept = sorted(p.name for p in run_dir.glob("mesh-*.*") if p.suffix in (".glb", ".obj", ".mtl", ".png", ".ply"))
    files = [n for n in ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "mesh.ply", *kept, "gaussians.ply",
                         "gaussians.png", "turntable.mp4", "preview.png", "config.yaml", "metrics.jsonl", "mesh.json")
             if _exists(run_dir, n)]
    if files:
        body.append("<h2>Files</h2><p>" + " · ".join(f'<a href="{_href(n)}">{_esc(n)}</a>' for n in files) + "</p>")
    body.append(embedded)

    copy_assets(run_dir)
    path = run_dir / REPORT
    atomic_write_text(path, _page(f"threed: {title}", "\n".join(body)))
    return path


def run_report_current(run_dir: Path) -> bool:
    """Whether RUN_DIR/report.html is this version's page and newer than everything it shows."""
    report = Path(run_dir) / REPORT
    if not report.is_file() or not _assets_current(run_dir):
        return False
    with open(report, "rb") as f:
        if GENERATOR.encode() not in f.read(1024):
            return False
    written = report.stat().st_mtime
    return all(not (run_dir / n).exists() or (run_dir / n).stat().st_mtime <= written for n in RUN_INPUTS)


# -- bench pages ------------------------------------------------------------------------------------

# key, header, kind (num | int | rank | bool | text | status); a column shows when some row has its key.
RUN_COLUMNS = [
    ("method", "method", "text"), ("prompt", "prompt", "text"), ("image", "image", "text"), ("seed", "seed", "int"),
    ("status", "status", "status"), ("reference_psnr", "reference PSNR (dB)", "num"),
    ("reference_ssim", "reference SSIM", "num"), ("reference_mask_iou", "reference mask IoU", "num"),
    ("rank_color", "rank colour", "rank"), ("rank_textureless", "rank textureless", "rank"),
    ("clip_sim_color", "CLIP sim colour", "num"), ("clip_sim_textureless", "CLIP sim textureless", "num"),
    ("wall_time_s", "time (s)", "num"), ("it_per_s", "it/s", "num"), ("peak_memory_mb", "peak mem (MB)", "num"),
    ("faces", "faces", "int"), ("watertight", "watertight", "bool"), ("chamfer_l1", "Chamfer-L1", "num"),
    ("chamfer_l1_rel", "Chamfer-L1 (rel.)", "num"), ("fscore_1pct", "F-score@1%", "num"),
    ("fscore_2pct", "F-score@2%", "num"), ("normal_consistency", "normal consistency", "num"), ("steps", "steps", "int"),
    ("device", "device", "text"),
]
RUN_HIDDEN = {"run_dir", "thumbnail", "error"}
SUMMARY_COLUMNS = [
    ("method", "method", "text"), ("finished", "runs done", "done"), ("r_at_1_color", "R@1 colour", "num"),
    ("r_at_1_textureless", "R@1 textureless", "num"), ("mean_clip_sim_color", "CLIP sim", "num"),
    ("mean_reference_psnr", "reference PSNR (dB)", "num"), ("mean_reference_ssim", "reference SSIM", "num"),
    ("mean_reference_mask_iou", "reference mask IoU", "num"),
    ("mean_wall_time_s", "time (s)", "num"), ("mean_it_per_s", "it/s", "num"),
    ("max_peak_memory_mb", "peak mem (MB)", "num"), ("mean_faces", "faces", "num"),
    ("watertight_fraction", "watertight", "num"), ("mean_chamfer_l1", "Chamfer-L1", "num"),
    ("mean_fscore_1pct", "F-score@1%", "num"), ("mean_normal_consistency", "normal consistency", "num"),
]
SUMMARY_HIDDEN = {"runs", "inflated"}


def _columns(known: list[tuple[str, str, str]], hidden: set[str], rows: list[dict]) -> list[tuple[str, str, str]]:
    present = {k for r in rows for k in r}
    cols = [c for c in known if c[0] in present]
    named = {c[0] for c in known} | hidden
    for k in dict.fromkeys(k for r in rows for k in r):  # columns a newer bench adds show up as they are
        if k not in named:
            sample = next((r[k] for r in rows if not _missing(r.get(k))), None)
            kind = "bool" if isinstance(sample, bool) else "num" if isinstance(sample, (int, float)) else "text"
            cols.append((k, k.replace("_", " "), kind))
    return cols


def _cell(row: dict, key: str, kind: str) -> str:
    value = row.get(key)
    if kind == "done":
        return f'<td class="num" data-sort="{_esc(value)}">{_esc(value)}/{_esc(row.get("runs", "?"))}</td>'
    if kind == "status":
        error = row.get("error") or ""
        extra = f' title="{_esc(error)}"' if error else ""
        text = _esc(value) + (f": {_esc(error)}" if error else "")
        return f'<td data-sort="{_esc(value)}"{extra}>{text}</td>'
    if _missing(value):
        return '<td class="na">–</td>'
    if kind == "bool":
        return f'<td data-sort="{int(bool(value))}">{"yes" if value else "no"}</td>'
    if kind in ("num", "int", "rank") and isinstance(value, (int, float)) and not isinstance(value, bool):
        shown = value + 1 if kind == "rank" else value  # ranks are stored from 0; 1 = retrieved
        return f'<td class="num" data-sort="{shown!r}">{_esc(_fmt(shown))}</td>'
    return f"<td>{_esc(value)}</td>"


def results_table(rows: list[dict], columns: list[tuple[str, str, str]], table_id: str,
                  anchors: Iterable[str] | None = None) -> str:
    """A sortable table: one <tr> per row, numbers carry data-sort so they sort as numbers."""
    anchors = list(anchors) if anchors is not None else None
    head = "".join(f"<th>{_esc(h)}</th>" for _, h, _ in columns) + ("<th>gallery</th>" if anchors else "")
    body = []
    for i, r in enumerate(rows):
        cls = ' class="failed"' if r.get("status") not in (None, "done") else ""
        cells = "".join(_cell(r, k, kind) for k, _, kind in columns)
        if anchors:
            cells += f'<td><a href="#{_esc(anchors[i])}">view</a></td>'
        body.append(f"<tr{cls}>{cells}</tr>")
    return (f'<div class="table-wrap"><table class="sortable" id="{_esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _rel(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def _entry(bench_dir: Path, row: dict, anchor: str) -> str:
    run_dir = bench_dir / str(row.get("run_dir", ""))
    rel = _rel(run_dir, bench_dir)
    title = f"{row.get('method', '?')} · {row.get('prompt') or row.get('image', '')} · seed {row.get('seed', '?')}"
    status = str(row.get("status", ""))
    has_run = bool(row.get("run_dir")) and run_dir.is_dir()
    video = f"{rel}/turntable.mp4" if has_run and _exists(run_dir, "turntable.mp4") else None
    if has_run and _exists(run_dir, "mesh.glb") and (run_dir / REPORT).is_file():
        viewer = (f'<iframe src="{_href(rel + "/" + REPORT)}#viewer" loading="lazy" '
                  f'title="3D view of {_esc(title)}"></iframe>')
    else:
        viewer = _placeholder("No 3D mesh: this run has no mesh.glb" + ("." if status == "done" else f" ({status})."))
    preview = None
    if has_run and _exists(run_dir, "preview.png"):
        preview = f"{rel}/preview.png"
    elif row.get("thumbnail") and (bench_dir / str(row["thumbnail"])).is_file():
        preview = str(row["thumbnail"])
    link = f' · <a href="{_href(rel + "/" + REPORT)}">run page</a>' if has_run and (run_dir / REPORT).is_file() else ""
    return (f'<section class="entry" id="{_esc(anchor)}"><h3>{_esc(title)} <span class="status">({_esc(status)})</span>'
            f"{link}</h3><div class=\"media\">"
            + _figure(_video(video, "none"), "turntable")
            + _figure(viewer, "mesh.glb: drag to orbit", "viewer-figure")
            + _figure(_preview(preview, f"preview of {title}"), "preview grid", "preview")
            + "</div></section>")


def write_bench_report(bench_dir: Path | str, rows: list[dict], summary: list[dict], meta: dict) -> Path:
    """Write BENCH_DIR/report.html (and report_files/) from threed.bench's rows, summary and meta; each run
    folder's own report.html is (re)written where missing or older than its files. Returns the path."""
    bench_dir = Path(bench_dir)
    for row in rows:
        run_dir = bench_dir / str(row.get("run_dir", ""))
        if row.get("run_dir") and run_dir.is_dir() and not run_report_current(run_dir):
            write_run_report(run_dir)

    prompts, methods, seeds = meta.get("prompts") or [], meta.get("methods") or [], meta.get("seeds") or []
    body = ["<h1>threed benchmark</h1>"]
    if meta.get("command"):
        body.append(f'<p class="meta">Command: <code>{_esc(meta["command"])}</code></p>')
    images = meta.get("images") or []
    facts = [f"{len(images)} images" if images else f"{len(prompts)} prompts"]
    facts[0] += f" × {len(methods)} methods × {len(seeds)} seeds"
    budget = meta.get("budget")  # {method: {stage: steps, ..., "total": steps}}; older benches only had "steps"
    if isinstance(budget, dict) and budget:
        facts.append("budget per run (all stages): "
                     + ", ".join(f"{m} {b.get('total', '?')} steps" for m, b in budget.items() if isinstance(b, dict)))
    elif meta.get("steps"):
        facts[0] += f", {meta['steps']} steps each"
    ev = meta.get("evaluator")
    if ev:
        facts.append(f"evaluator CLIP {ev[0]} ({ev[1]}), {meta.get('views', '?')} views of {meta.get('size', '?')} px")
    if isinstance(meta.get("chance"), (int, float)):
        facts.append(f"R@1 chance level {meta['chance']:.3f}")
    body.append(f'<p class="meta">{_esc("; ".join(facts))}.</p>')

    body.append("<h2>Summary</h2>")
    if summary:
        shown = [dict(s) for s in summary]
        for s in shown:
            if s.get("inflated"):
                s["method"] = f"{s['method']} (inflated)"
        body.append(results_table(shown, _columns(SUMMARY_COLUMNS, SUMMARY_HIDDEN, shown), "summary"))
        if any(s.get("inflated") for s in summary):
            body.append('<p class="note"><em>Inflated</em>: the evaluator CLIP is also that method\'s guidance CLIP, '
                        "which was optimised to please it; pick another --eval-clip-model for a fair score.</p>")
        body.append('<p class="note">Reference PSNR, SSIM, mask IoU: the render from each result\'s reference camera '
                    "against its input image. Click a header to sort.</p>" if images else
                    '<p class="note">R@1: fraction of a method\'s results whose own prompt has the highest '
                    "evaluator-CLIP similarity among all prompts. Click a header to sort.</p>")
    else:
        body.append(_placeholder("No summary yet."))

    plots = [p for p in BENCH_PLOTS if (bench_dir / p).is_file()]
    plots += sorted(p.name for p in bench_dir.glob("*.png") if p.name not in plots)
    body.append("<h2>Plots</h2>")
    body.append('<div class="plots">' + "".join(f'<img src="{_href(p)}" alt="{_esc(p)}" data-what="{_esc(p)}">'
                                                for p in plots) + "</div>" if plots else _placeholder("No plots."))

    anchors = [f"run-{i}" for i in range(len(rows))]
    body.append("<h2>Runs</h2>")
    body.append(results_table(rows, _columns(RUN_COLUMNS, RUN_HIDDEN, rows), "runs", anchors) if rows
                else _placeholder("No runs."))
    if not images:
        body.append('<p class="note">Rank: position of the run\'s own prompt among all prompts (1 = retrieved).</p>')
    body.append("<h2>Gallery</h2>")
    body.extend(_entry(bench_dir, r, a) for r, a in zip(rows, anchors))

    copy_assets(bench_dir)
    path = bench_dir / REPORT
    atomic_write_text(path, _page("threed benchmark", "\n".join(body)))
    return path


def write_report(directory: Path | str) -> Path:
    """report.html for a bench folder (results.json) or a run folder (config.yaml / metrics.jsonl)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder: pass the --out folder of `threed run` or `threed bench`")
    results = directory / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text())
            return write_bench_report(directory, data["runs"], data.get("summary") or [], data.get("benchmark") or {})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{results} is damaged: re-run the same `threed bench` command to rewrite it") from None
    if RunDir(directory).is_run() or RunDir(directory).metrics_path.is_file():
        return write_run_report(directory)
    raise UserError(f"{directory} holds neither a run (config.yaml) nor a benchmark (results.json): "
                    "pass the --out folder of `threed run` or `threed bench`")


# -- serving ----------------------------------------------------------------------------------------

class _Handler(SimpleHTTPRequestHandler):
    """Static files with byte ranges (browsers seek in videos with them) and no request log."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".glb": "model/gltf-binary", ".mp4": "video/mp4",
                      ".js": "text/javascript", ".jsonl": "text/plain; charset=utf-8",
                      ".yaml": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8",
                      ".csv": "text/plain; charset=utf-8", ".mtl": "text/plain; charset=utf-8",
                      ".obj": "text/plain; charset=utf-8"}
    _range: int | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        pass

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def send_head(self):  # type: ignore[override]
        self._range = None
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
        if not match or not (match[1] or match[2]) or not os.path.isfile(path):
            return super().send_head()  # no range, several ranges or not a file: the whole answer
        size = os.path.getsize(path)
        if match[1]:
            start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
        else:
            start, end = max(0, size - int(match[2])), size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._range = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
        if self._range is None:
            return super().copyfile(source, outputfile)
        remaining = self._range
        while remaining > 0:
            chunk = source.read(min(1 << 16, remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a browser dropping a video request is normal
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class Server:
    """A folder served on 127.0.0.1 from a background thread; `close()` stops it."""

    def __init__(self, directory: Path, port: int):
        self.directory = Path(directory)
        self.httpd = _Server(("127.0.0.1", port), partial(_Handler, directory=str(self.directory)))
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/{REPORT}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="threed-view", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve(directory: Path | str, port: int = 8000) -> Server:
    """Serve `directory` on http://127.0.0.1:PORT/ (0 picks a free port) from a thread; returns the Server
    (its `.url` is the report's address)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number: pass one from 1 to 65535 (0 picks a free one)")
    try:
        return Server(Path(directory), port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on 127.0.0.1 is in use: pass another --port (0 picks a free one)") from None
        raise UserError(f"cannot serve on 127.0.0.1:{port} ({e.strerror}): pass another --port") from None


def view(directory: Path | str, port: int | None = None) -> None:
    """`threed view DIR`: write report.html if missing, serve DIR, print the URL, stop cleanly on Ctrl-C."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder: pass the --out folder of `threed run` or `threed bench`")
    if not (directory / REPORT).is_file():
        print(f"threed: wrote {write_report(directory)}", flush=True)
    try:
        server = serve(directory, 8000 if port is None else port)
    except UserError:
        if port is not None:
            raise
        server = serve(directory, 0)  # the default port is taken: any free one will do
    print(f"threed: serving {directory} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        while server.thread.is_alive():
            server.thread.join(0.5)
    except KeyboardInterrupt:
        print("threed: stopped", flush=True)
    finally:
        server.close()
