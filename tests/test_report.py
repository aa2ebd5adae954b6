"""report.html for run and bench folders: the HTML's content and escaping, `threed view`'s server, and the
pages in a real headless Chromium (3D viewer draws the mesh, video plays, tables sort, no console errors).

The browser tests need Chromium and Python's playwright (`apt-get install -y chromium`, `pip install
playwright`); without them they skip, unless THREED_REQUIRE_BROWSER=1 (CI) turns the skip into a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

import shapes
from exporters.glb import write_glb
from exporters.video import write_image_grid, write_video
from threed import pipeline, report
from threed.config import build_config
from threed.errors import UserError
from threed.mesh import Mesh, vertex_normals

ROOT = Path(__file__).resolve().parents[1]
NASTY = "a <b>bold</b> \"duck\" & 'friends' </script><script>alert(1)</script>"
MESH_RGB = (0.85, 0.12, 0.10)  # a red mesh: its pixels cannot be mistaken for the grey viewer background
BACKGROUND = tuple(int(report.VIEWER_BACKGROUND[i:i + 2], 16) for i in (1, 3, 5))


# -- tiny artifacts -------------------------------------------------------------------------------------

def coloured_mesh() -> Mesh:
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    v = np.asarray(sphere.vertices, dtype=np.float32)
    f = np.asarray(sphere.faces, dtype=np.int64)
    colors = np.tile(np.float32(MESH_RGB), (len(v), 1))
    colors[:, 1] += 0.2 * (v[:, 1] > 0)  # a little variation, still clearly red
    return Mesh(v, f, colors, vertex_normals(v, f))


def make_run(run_dir: Path, prompt: str, glb: bool = True, video: bool = True, preview: bool = True,
             done: bool = True, steps: int = 20) -> Path:
    """A run folder as `threed run` leaves it, from tiny artifacts (no training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    quoted = "'" + prompt.replace("'", "''") + "'"
    (run_dir / "config.yaml").write_text(f"prompt: {quoted}\nmethod: dreamfusion\nseed: 3\nsteps: {steps}\n"
                                         "guidance:\n  type: stable_diffusion\n  sd:\n    guidance_scale: 100.0\n")
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "loss_guidance": 1.5 / s, "t": 0.5, "time_s": 0.1 * s})
             for s in range(1, steps + 1)]
    if done:
        lines.append(json.dumps({"step": steps, "done": True, "wall_time_s": 12.5, "it_per_s": 1.6,
                                 "peak_memory_mb": 512.0, "export_time_s": 0.4, "device": "cpu"}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if glb:
        mesh = coloured_mesh()
        write_glb(run_dir / "mesh.glb", mesh.vertices, mesh.faces, mesh.colors, mesh.normals)
        (run_dir / "mesh.json").write_text(json.dumps({"meshes": {"mesh.glb": {"threshold": 10.0, "vertices": 162,
                                                                               "faces": 320}}}))
    if video:  # 16 frames at 8 fps: a 2 s loop, long enough to see currentTime advance
        frames = [np.full((32, 32, 3), (16 * i, 80, 200 - 8 * i), np.uint8) for i in range(16)]
        write_video(frames, run_dir / "turntable.mp4", fps=8)
    if preview:
        tiles = [np.full((16, 16, 3), c, np.uint8) for c in (40, 90, 140, 190)]
        write_image_grid(tiles, run_dir / "preview.png", cols=2)
    return run_dir


def write_png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (40, 30), colour).save(path)


# Rows and summary as threed.bench.collect makes them. Times are chosen so that sorting them as text, even
# with numeric collation, is wrong ("100" < "9.25" < "9.5", and 9.5 < 9.25 digit run by digit run); the
# failed run has no time at all.
PROMPTS = ["a red ball", NASTY, "a teapot"]


def bench_rows() -> list[dict]:
    rows = []
    for i, (prompt, time_s, status) in enumerate(zip(PROMPTS, (100.0, 9.5, ""), ("done", "done", "failed"))):
        done = status == "done"
        rows.append({
            "method": "sds", "prompt": prompt, "seed": 0, "status": status, "steps": 20 if done else "",
            "wall_time_s": time_s, "it_per_s": 1.6 if done else "", "peak_memory_mb": 512.0 if done else "",
            "device": "cpu" if done else "",
            **({"clip_sim_color": 0.25 + 0.01 * i, "rank_color": i, "clip_sim_textureless": 0.2,
                "rank_textureless": 0, "faces": 320, "watertight": i == 0} if done else {}),
            "run_dir": f"runs/sds/run{i}-s0", "thumbnail": "",
            "error": "" if done else "RuntimeError: CUDA out of memory & <more>",
        })
    rows.append({**rows[0], "method": "clip", "prompt": "a red ball", "wall_time_s": 9.25, "rank_color": 1,
                 "run_dir": "runs/clip/run0-s0", "thumbnail": "thumbs/clip/run0-s0.png"})
    return rows


def bench_summary() -> list[dict]:
    return [{"method": "sds", "runs": 3, "finished": 2, "inflated": False, "r_at_1_color": 0.5,
             "r_at_1_textureless": float("nan"), "mean_clip_sim_color": 0.255, "mean_wall_time_s": 54.75,
             "mean_it_per_s": 1.6, "max_peak_memory_mb": 512.0, "mean_faces": 320.0, "watertight_fraction": 0.5},
            {"method": "clip", "runs": 1, "finished": 1, "inflated": True, "r_at_1_color": 1.0,
             "r_at_1_textureless": 1.0, "mean_clip_sim_color": 0.25, "mean_wall_time_s": 10.25,
             "mean_it_per_s": 1.6, "max_peak_memory_mb": 512.0, "mean_faces": 320.0, "watertight_fraction": 1.0}]


def bench_meta() -> dict:
    return {"command": "threed bench --prompts p.txt --methods sds,clip --steps 20 --out b", "prompts": PROMPTS,
            "methods": ["sds", "clip"], "seeds": [0], "steps": 20, "evaluator": ["ViT-B-16", "openai"],
            "views": 8, "size": 224, "chance": 1 / 3, "reference": None}


def make_bench(bench_dir: Path) -> Path:
    """A bench folder: two finished sds runs (one without a video), a failed one with nothing, a clip run
    with only a bench thumbnail as preview, and the bench's plots."""
    rows = bench_rows()
    make_run(bench_dir / rows[0]["run_dir"], rows[0]["prompt"])
    make_run(bench_dir / rows[1]["run_dir"], rows[1]["prompt"], video=False)
    make_run(bench_dir / rows[3]["run_dir"], rows[3]["prompt"], preview=False)
    (bench_dir / "thumbs/clip").mkdir(parents=True)
    write_png(bench_dir / rows[3]["thumbnail"], (200, 40, 40))
    for name, colour in zip(report.BENCH_PLOTS, ((30, 60, 200), (200, 120, 30), (30, 160, 60))):
        write_png(bench_dir / name, colour)
    report.write_bench_report(bench_dir, rows, bench_summary(), bench_meta())
    return bench_dir


# -- reading the HTML back ------------------------------------------------------------------------------

class Tree(HTMLParser):
    """Tables (by id: rows of (text, attrs) cells), and every element's tag and attributes."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[tuple[str, dict]]]] = {}
        self.elements: list[tuple[str, dict]] = []
        self.texts: dict[str, str] = {}  # tag -> text of its first occurrence (h1, title, pre)
        self._table: str | None = None
        self._cell: list | None = None
        self._open: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ["", a]
        if tag in ("h1", "title", "pre") and tag not in self.texts:
            self._open.append(tag)
            self.texts[tag] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "table":
            self._table = None
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        for tag in self._open:
            self.texts[tag] += data

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def column(table: list[list[tuple[str, dict]]], header: str) -> list[tuple[str, dict]]:
    j = [text for text, _ in table[0]].index(header)
    return [row[j] for row in table[1:]]


# -- the HTML -------------------------------------------------------------------------------------------

def test_bench_tables_match_the_data(tmp_path):
    bench = make_bench(tmp_path / "bench")
    page = Tree((bench / "report.html").read_text())
    rows = bench_rows()
    runs = page.tables["runs"]
    assert len(runs) == 1 + len(rows)
    assert [t for t, _ in column(runs, "prompt")] == [r["prompt"] for r in rows]
    assert [t for t, _ in column(runs, "method")] == [r["method"] for r in rows]
    times = column(runs, "time (s)")
    assert [float(a["data-sort"]) for _, a in times[:2] + times[3:]] == [100.0, 9.5, 9.25]
    assert times[2][1].get("class") == "na" and "data-sort" not in times[2][1]  # the failed run: no time
    assert [t for t, _ in column(runs, "rank colour")] == ["1", "2", "–", "2"]  # stored from 0, shown from 1
    assert [t for t, _ in column(runs, "watertight")] == ["yes", "no", "–", "yes"]
    status = column(runs, "status")[2]
    assert status[0] == "failed: RuntimeError: CUDA out of memory & <more>"
    assert [t for t, _ in column(runs, "gallery")] == ["view"] * 4
    assert "run_dir" not in [t for t, _ in runs[0]] and "error" not in [t for t, _ in runs[0]]

    summary = page.tables["summary"]
    assert [t for t, _ in column(summary, "method")] == ["sds", "clip (inflated)"]
    assert [t for t, _ in column(summary, "runs done")] == ["2/3", "1/1"]
    assert [t for t, _ in column(summary, "R@1 textureless")] == ["–", "1"]  # NaN shows as missing
    assert [float(a["data-sort"]) for _, a in column(summary, "time (s)")] == [54.75, 10.25]
    for plot in report.BENCH_PLOTS:
        assert page.find("img", src=plot)


def test_unknown_result_columns_are_shown(tmp_path):
    rows = [{**r, "attempts": i + 1, "worker": f"node-{i}"} for i, r in enumerate(bench_rows())]
    report.write_bench_report(tmp_path, rows, [], {})
    runs = Tree((tmp_path / "report.html").read_text()).tables["runs"]
    assert [t for t, _ in column(runs, "attempts")] == ["1", "2", "3", "4"]
    assert [t for t, _ in column(runs, "worker")] == ["node-0", "node-1", "node-2", "node-3"]


def test_prompts_and_config_are_escaped(tmp_path):
    bench = make_bench(tmp_path / "bench")
    for path in (bench / "report.html", bench / "runs/sds/run1-s0/report.html"):
        text = path.read_text()
        assert "<b>bold</b>" not in text and "<script>alert(1)" not in text
        assert "&lt;b&gt;bold&lt;/b&gt; &quot;duck&quot; &amp; &#x27;friends&#x27;" in text
    page = Tree((bench / "report.html").read_text())
    assert column(page.tables["runs"], "prompt")[1][0] == NASTY
    assert any(NASTY in a.get("title", "") for a in page.find("iframe"))
    run_page = Tree((bench / "runs/sds/run1-s0/report.html").read_text())
    assert run_page.texts["h1"] == NASTY and run_page.texts["title"] == f"threed: {NASTY}"
    assert run_page.texts["pre"] == (bench / "runs/sds/run1-s0/config.yaml").read_text()


def test_run_page_content(tmp_path):
    run = make_run(tmp_path / "run", "a red ball", steps=20)
    path = report.write_run_report(run)
    page = Tree(path.read_text())
    (viewer,) = page.find("div", **{"class": "viewer"})
    inline = [a for t, a in page.elements if t == "script" and a.get("id") == viewer["data-glb-inline"]]
    assert viewer["data-glb"] == "mesh.glb" and len(inline) == 1
    blob = re.search(r'id="glb-data">([^<]*)</script>', path.read_text())[1]
    assert base64.b64decode(blob) == (run / "mesh.glb").read_bytes()
    (video,) = page.find("video")
    assert video["src"] == "turntable.mp4" and {"muted", "loop", "controls"} <= set(video)
    assert page.find("img", src="preview.png")
    text = path.read_text()
    assert "<dt>wall_time_s</dt><dd>12.5</dd>" in text and "<dt>mesh faces</dt><dd>320</dd>" in text
    # the loss curve: one polyline per loss series, one point per logged step
    lines = re.findall(r'<polyline[^>]* points="([^"]*)"', text)
    assert len(lines) == 2 and all(len(pts.split()) == 20 for pts in lines)
    for name in report.ASSET_FILES.values():
        assert (run / report.ASSETS / name).is_file()
    assert (run / report.ASSETS / "three.min.js").read_bytes() == (report.WEB / "vendor/three.min.js").read_bytes()


def test_a_gaussian_run_page_shows_the_gaussians(tmp_path):
    """A Gaussian-splatting run (gaussians.png and gaussians.ply beside the mesh) gets a Gaussians section
    with the picture and both files linked; other runs get none."""
    run = make_run(tmp_path / "run", "a red ball", steps=3)
    assert "<h2>Gaussians</h2>" not in report.write_run_report(run).read_text()
    write_png(run / "gaussians.png", (200, 30, 30))
    (run / "gaussians.ply").write_bytes(b"ply\n")
    earlier = (run / "gaussians.png").stat().st_mtime - 10
    os.utime(run / "report.html", (earlier, earlier))
    assert not report.run_report_current(run)  # a new picture of the Gaussians: the page is stale
    page = Tree(report.write_run_report(run).read_text())
    (img,) = page.find("img", src="gaussians.png")
    assert img["data-what"] == "the Gaussians"
    text = (run / "report.html").read_text()
    assert "<h2>Gaussians</h2>" in text and text.index("<h2>Gaussians</h2>") < text.index("<h2>Final metrics</h2>")
    assert page.find("a", href="gaussians.ply") and page.find("a", href="gaussians.png")


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory) -> Path:
    """A two-step `threed.pipeline.run` under the oracle prior at a few seconds' size: its config.yaml is
    the one a run saves, so the page reads the keys runs write, not ones a test wrote by hand."""
    root = tmp_path_factory.mktemp("oracle")
    reference = shapes.save(shapes.sphere(), root / "sphere.ply")
    cfg = build_config("oracle", [
        f"guidance.oracle.reference={reference}", "steps=2", "device=cpu", "checkpoint_every=0", "render.width=16",
        "render.height=16", "render.num_samples=16", "render.occupancy_resolution=16", "guidance.oracle.views=1",
        "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64", "export.resolution=24",
        "export.threshold=5.0", "export.video=false", "export.preview_views=0", "export.formats=[glb]"])
    pipeline.run(cfg, root / "run", progress=False)
    return root / "run"


def test_an_oracle_run_page_names_its_reference(oracle_run, tmp_path):
    """An oracle run has no prompt: its page is titled by the reference mesh (guidance.oracle.reference)."""
    page = Tree(report.write_run_report(oracle_run).read_text())
    assert page.texts["h1"] == "reference sphere.ply" and page.texts["title"] == "threed: reference sphere.ply"
    assert "prior oracle" in (oracle_run / "report.html").read_text()
    assert page.texts["pre"] == (oracle_run / "config.yaml").read_text()

    # a run folder of threed 0.1 (its oracle preset as 0.1 saved it: guidance.reference), never resumed
    old = shutil.copytree(oracle_run, tmp_path / "old")
    cfg = json.loads((ROOT / "tests/data/preset-snapshots/oracle.json").read_text())
    cfg["guidance"]["reference"] = str(oracle_run.parent / "sphere.ply")
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert Tree(report.write_run_report(old).read_text()).texts["h1"] == "reference sphere.ply"


def test_loss_curve_geometry():
    records = [{"step": s, "loss": 1000.0 / s} for s in range(1, 101)]
    svg = report.loss_curve_svg(records, width=400, height=200)
    assert "log scale" in svg  # 1000 down to 10: 100x
    pts = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]*)"', svg)[1].split()]
    xs, ys = zip(*pts)
    assert xs == tuple(sorted(xs)) and ys == tuple(sorted(ys))  # later steps to the right, lower loss lower
    # on a log scale 1000/s is a straight line against log(s), so the midpoint in log(loss) is at s = 10
    mid = pts[9]
    assert abs(mid[1] - (ys[0] + ys[-1]) / 2) < 1.0
    assert report.loss_curve_svg([{"step": 1, "loss": 1.0}]) == ""
    assert report.loss_curve_svg([{"step": s, "loss": float("nan")} for s in range(5)]) == ""
    many = report.loss_curve_svg([{"step": s, "loss": 1.0 + (s % 7)} for s in range(5000)], max_points=500)
    assert "log scale" not in many and len(re.search(r'points="([^"]*)"', many)[1].split()) <= 501


def test_missing_artifacts_are_placeholders(tmp_path):
    run = make_run(tmp_path / "run", "a red ball", glb=False, video=False, preview=False, done=False)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # cut short by a crash
    page = Tree(report.write_run_report(run).read_text())
    text = (run / "report.html").read_text()
    assert not page.find("video") and not page.find("img") and not page.find("div", **{"class": "viewer"})
    for words in ("No 3D mesh (mesh.glb)", "No turntable video", "No preview grid", "has not finished",
                  "No loss curve"):
        assert words in text, words

    bench = make_bench(tmp_path / "bench")
    text = (bench / "report.html").read_text()
    entries = re.findall(r'<section class="entry" id="run-(\d)">(.*?)</section>', text, re.S)
    by_id = dict(entries)
    assert "<video" not in by_id["1"] and "No turntable video" in by_id["1"]  # run1 has no video
    assert "<iframe" not in by_id["2"] and "<video" not in by_id["2"] and "<img" not in by_id["2"]  # failed
    assert "No 3D mesh: this run has no mesh.glb (failed)." in by_id["2"]
    assert 'src="thumbs/clip/run0-s0.png"' in by_id["3"]  # no preview.png: the bench's thumbnail instead


def test_run_reports_are_rewritten_when_their_files_change(tmp_path):
    bench = make_bench(tmp_path / "bench")
    run = bench / "runs/sds/run0-s0"
    assert report.run_report_current(run)
    before = (run / "report.html").stat().st_mtime_ns
    report.write_bench_report(bench, bench_rows(), bench_summary(), bench_meta())
    assert (run / "report.html").stat().st_mtime_ns == before  # current: left alone
    earlier = (run / "mesh.glb").stat().st_mtime - 10
    os.utime(run / "report.html", (earlier, earlier))  # the mesh was re-exported after the page was written
    assert not report.run_report_current(run)
    report.write_bench_report(bench, bench_rows(), bench_summary(), bench_meta())
    assert report.run_report_current(run)


def test_write_report_finds_the_folder_kind(tmp_path):
    bench = tmp_path / "bench"
    make_bench(bench)
    (bench / "report.html").unlink()
    safe = json.loads(json.dumps({"benchmark": bench_meta(), "summary": bench_summary(), "runs": bench_rows()})
                      .replace("NaN", "null"))  # as threed.bench writes results.json
    (bench / "results.json").write_text(json.dumps(safe))
    assert report.write_report(bench) == bench / "report.html"
    assert len(Tree((bench / "report.html").read_text()).tables["runs"]) == 5
    run = make_run(tmp_path / "run", "a red ball")
    assert report.write_report(run) == run / "report.html"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run"):
        report.write_report(tmp_path / "empty")
    (bench / "results.json").write_text("{")
    with pytest.raises(UserError, match="results.json is damaged"):
        report.write_report(bench)


# -- serving ----------------------------------------------------------------------------------------------

def fetch(url: str, headers: dict | None = None):
    """(status, headers (case-insensitive), body)"""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_server_answers_byte_ranges(tmp_path):
    run = make_run(tmp_path / "run", "a red ball")
    report.write_run_report(run)
    server = report.serve(run, 0)
    try:
        base = server.url.rsplit("/", 1)[0]
        status, headers, body = fetch(server.url)
        assert status == 200 and body == (run / "report.html").read_bytes()
        video = (run / "turntable.mp4").read_bytes()
        status, headers, body = fetch(f"{base}/turntable.mp4", {"Range": "bytes=10-29"})
        assert status == 206 and body == video[10:30] and headers["Content-Range"] == f"bytes 10-29/{len(video)}"
        assert headers["Content-Type"] == "video/mp4"
        status, _, body = fetch(f"{base}/turntable.mp4", {"Range": "bytes=-7"})
        assert status == 206 and body == video[-7:]
        status, _, body = fetch(f"{base}/turntable.mp4", {"Range": "bytes=5-"})
        assert status == 206 and body == video[5:]
        status, headers, _ = fetch(f"{base}/turntable.mp4", {"Range": f"bytes={len(video)}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(video)}"
        status, headers, body = fetch(f"{base}/mesh.glb")
        assert status == 200 and headers["Content-Type"] == "model/gltf-binary"
        with pytest.raises(UserError, match=f"port {server.port} on 127.0.0.1 is in use"):
            report.serve(run, server.port)
    finally:
        server.close()


def test_view_command_serves_and_stops_on_ctrl_c(tmp_path):
    run = make_run(tmp_path / "run", "a red ball")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "threed.cli", "view", str(run), "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: queue.Queue[str] = queue.Queue()  # read by a thread, so a silent hang fails instead of blocking
    threading.Thread(target=lambda: [printed.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = [printed.get(timeout=30), printed.get(timeout=30)]
        assert first[0].startswith("threed: wrote ") and first[0].strip().endswith("report.html"), first
        url = re.search(r"at (http://127\.0\.0\.1:\d+/report\.html) \(Ctrl-C stops\)", first[1])[1]
        status, _, body = fetch(url)
        assert status == 200 and b"a red ball" in body
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    err = proc.stderr.read()
    assert proc.returncode in (0, 130) and "Traceback" not in err, err
    assert printed.get(timeout=5).strip() == "threed: stopped"


def test_view_bad_input_is_one_line(tmp_path, capsys):
    from threed.cli import main

    assert main(["view", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == (f"threed: error: {tmp_path / 'nowhere'} is not a folder: pass the "
                                               "--out folder of `threed run` or `threed bench`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        run = make_run(tmp_path / "run", "a red ball")
        assert main(["view", str(run), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use: pass another --port" in capsys.readouterr().err


# -- in a real browser ------------------------------------------------------------------------------------

CHROMIUM_ARGS = ["--use-gl=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def chromium_path() -> str | None:
    """A system Chromium or Chrome: Playwright's own builds cannot play H.264 (turntable.mp4)."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def browser():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed: pip install playwright"
    if reason is None and chromium_path() is None:
        reason = "Chromium is not installed: apt-get install -y chromium"
    if reason is not None:
        if os.environ.get("THREED_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gallery")
    run = make_run(root / "run", "a red ball")
    report.write_run_report(run)
    large = make_run(root / "large", "a red ball")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "EMBED_LIMIT", 100)  # as if mesh.glb were too large to embed
        report.write_run_report(large)
    return {"run": run, "bench": make_bench(root / "bench"), "large": large}


@pytest.fixture(params=["file", "http"])
def open_page(request, browser, folders):
    """Open a folder's report.html from disk or through `threed view`'s server; yields (page, errors)."""
    pages, servers = [], []

    def _open(kind: str):
        folder = folders[kind]
        if request.param == "http":
            servers.append(report.serve(folder, 0))
            url = servers[-1].url
        else:
            url = (folder / "report.html").as_uri()
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        pages.append(page)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"{m.text} ({m.location.get('url')})")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        return page, errors

    yield _open
    for page in pages:
        page.close()
    for server in servers:
        server.close()


def canvas_pixels(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


def assert_draws_the_mesh(canvas) -> None:
    """The mesh covers part of the canvas, in its own colour. Measured on a 320 px viewer (Chromium 150,
    SwiftShader): 19.9% of the pixels differ from the background by > 30 levels and 19.6% are red
    (R > G + 60 and R > B + 60); the same sphere drawn without its vertex colours (white material) gives
    5.6% and 0%. Asked: more than 10% and 5%, half the measured values."""
    px = canvas_pixels(canvas)
    differs = (np.abs(px - np.array(BACKGROUND)).max(axis=-1) > 30).mean()
    red = ((px[..., 0] > px[..., 1] + 60) & (px[..., 0] > px[..., 2] + 60)).mean()
    assert differs > 0.10 and red > 0.05, (differs, red)


PLAY = """async (video) => {
  await video.play();
  const t0 = video.currentTime;
  await new Promise(r => setTimeout(r, 400));
  return {ready: video.readyState, t0: t0, t1: video.currentTime, paused: video.paused, error: video.error};
}"""


def assert_plays(video) -> None:
    state = video.evaluate(PLAY)
    assert state["error"] is None and state["ready"] >= 2 and not state["paused"], state  # 2: HAVE_CURRENT_DATA
    assert state["t1"] != state["t0"], state  # time moves on (it may wrap: the video loops)


def test_run_page_in_browser(open_page):
    page, errors = open_page("run")
    page.wait_for_selector(".viewer[data-state=ready] canvas", timeout=15000)
    assert_draws_the_mesh(page.locator(".viewer canvas"))
    assert_plays(page.locator("video"))
    box = page.locator(".viewer canvas").bounding_box()  # drag to orbit: the picture changes
    before = canvas_pixels(page.locator(".viewer canvas"))
    page.mouse.move(box["x"] + 100, box["y"] + 160)
    page.mouse.down()
    page.mouse.move(box["x"] + 220, box["y"] + 120, steps=5)
    page.mouse.up()
    page.wait_for_timeout(100)
    assert np.abs(canvas_pixels(page.locator(".viewer canvas")) - before).max() > 30
    assert page.locator("svg.curve polyline").count() == 2
    assert page.locator("img[src='preview.png']").evaluate("img => img.naturalWidth") == 32
    assert errors == []


def test_bench_page_in_browser(open_page):
    page, errors = open_page("bench")
    # 3D views of runs are their own pages in frames, started when scrolled into view
    page.locator("#run-0").scroll_into_view_if_needed()
    frame = page.frame_locator("#run-0 iframe")
    frame.locator(".viewer[data-state=ready] canvas").wait_for(timeout=15000)
    assert_draws_the_mesh(frame.locator(".viewer canvas"))
    assert page.locator("#run-2 .missing").count() == 3  # the failed run: no video, mesh or preview
    assert_plays(page.locator("#run-0 video"))
    for plot in report.BENCH_PLOTS:
        assert page.locator(f"img[src='{plot}']").evaluate("img => img.naturalWidth") == 40

    headers = page.locator("#runs thead th").all_text_contents()

    def shown(header: str) -> list[str]:
        return page.locator("#runs tbody tr").evaluate_all(
            f"rows => rows.map(r => r.cells[{headers.index(header)}].textContent)")

    page.locator("#runs thead th button", has_text="time (s)").click()
    assert shown("time (s)") == ["9.25", "9.5", "100", "–"]  # numbers as numbers, missing last
    page.locator("#runs thead th button", has_text="time (s)").click()
    assert shown("time (s)") == ["100", "9.5", "9.25", "–"]
    assert page.locator("#runs thead th[aria-sort=descending]").all_text_contents() == ["time (s)"]
    page.locator("#runs thead th button", has_text="prompt").click()
    assert shown("prompt") == sorted(PROMPTS + ["a red ball"], key=str.lower)
    assert errors == []


def test_a_mesh_too_large_to_embed_is_fetched_when_served(open_page, request):
    page, errors = open_page("large")
    if request.node.callspec.params["open_page"] == "http":
        page.wait_for_selector(".viewer[data-state=ready] canvas", timeout=15000)
        assert_draws_the_mesh(page.locator(".viewer canvas"))
    else:  # a page opened from a file cannot read mesh.glb: it says what to do instead
        page.wait_for_selector(".viewer[data-state=error]", timeout=15000)
        assert "serve the folder with `threed view DIR`" in page.locator(".viewer .missing").text_content()
    assert errors == []


def test_an_empty_mesh_says_so(browser, tmp_path):
    run = make_run(tmp_path / "run", "a red ball", glb=False)
    write_glb(run / "mesh.glb", np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))  # what a run that found no surface exports
    report.write_run_report(run)
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((run / "report.html").as_uri())
    page.wait_for_selector(".viewer[data-state=error]", timeout=15000)
    assert page.locator(".viewer .missing").text_content().startswith("The mesh is empty")
    page.close()
    assert errors == []


def test_a_pbr_run_is_lit_by_its_environment_map(browser, tmp_path):
    """A PBR run's viewer (Fantasia3D's appearance stage: appearance.shading pbr) is lit by the run's own
    environment map, not the viewer's lights. The map is red toward +x, blue toward -x and green straight up,
    black elsewhere; a white rough sphere seen from the front (+z, a little above) must then be redder on its
    right than on its left, bluer on its left than on its right, and greener on top than at its sides: a
    quarter turn between threed's lat-long layout and three.js's would put red and blue in front and behind
    (the sides alike), a flip green at the bottom, and the viewer's own white lights would light every side
    alike. Measured (Chromium, SwiftShader, 320 px viewer, 2026-12-07): right (R, G, B) = (214, 157, 27), left
    (27, 157, 214), top (121, 239, 122): red and blue differ by 187 between the sides, green by 82 between the
    top and the sides (both sides see some of the green sky). Asked: 100, 100 and 40, about half."""
    from threed.render.hdr import write_hdr
    from threed.render.ibl import latlong_directions

    run = make_run(tmp_path / "run", "a white ball", video=False, preview=False, glb=False)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    v, f = np.asarray(sphere.vertices, np.float32), np.asarray(sphere.faces, np.int64)
    write_glb(run / "mesh.glb", v, f, np.ones_like(v), vertex_normals(v, f))
    dirs, _ = latlong_directions(64, 128, dtype=torch.float64)
    lobe = lambda axis: (dirs @ torch.tensor(axis, dtype=torch.float64)).clamp(min=0.0) ** 4  # noqa: E731
    image = torch.stack([lobe([1.0, 0, 0]), lobe([0, 1.0, 0]), lobe([-1.0, 0, 0])], dim=-1) * 3.0
    write_hdr(tmp_path / "env.hdr", image.float().numpy())
    with open(run / "config.yaml", "a") as config:
        config.write(f"appearance:\n  shading: pbr\n  env_map: {tmp_path / 'env.hdr'}\n  env_scale: 1.0\n")
    report.write_run_report(run)
    assert 'data-env="env-data"' in (run / "report.html").read_text()
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((run / "report.html").as_uri())
    page.wait_for_selector(".viewer[data-state=ready] canvas", timeout=15000)
    px = canvas_pixels(page.locator(".viewer canvas"))
    page.close()
    covered = np.abs(px - np.array(BACKGROUND)).max(axis=-1) > 30
    rows, cols = np.nonzero(covered)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    cy, cx = (top + bottom) // 2, (left + right) // 2
    near = lambda y, x: px[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(axis=0)  # noqa: E731
    inset = (right - left) // 8
    seen = {"right": near(cy, right - inset), "left": near(cy, left + inset), "top": near(top + inset, cx)}
    print({k: tuple(int(c) for c in value) for k, value in seen.items()})
    right, left, top = seen["right"], seen["left"], seen["top"]
    assert right[0] - left[0] > 100 and left[2] - right[2] > 100, seen
    assert top[1] - (right[1] + left[1]) / 2 > 40, seen
    assert errors == []
