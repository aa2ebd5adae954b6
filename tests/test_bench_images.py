"""`threed bench --images DIR`: every image of a folder through the image-to-3D methods (zero123 by default)
with one budget, each result scored by its reference view against its input image (PSNR, SSIM, mask IoU from
the run's closing record); bad folders are one line."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from test_zero123_run import TINY, _disc  # tests/ is on sys.path (conftest.py)
from threed.bench import child as bench_child
from threed.cli import main as cli
from threed.random_models import build_zero123
from threed.rundir import RunDir


@pytest.fixture(scope="module")
def tiny_zero123(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zero123(tmp_path_factory.mktemp("tiny") / "zero123", seed=0)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny models: a second thread on a busy 2-core machine only adds synchronisation (see test_bench.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("threed: error:"), err
    return lines[0]


@pytest.mark.parametrize("case, message", [
    ("missing", r"images folder .*nope not found: pass --images with a folder"),
    ("file", r"images folder .*a\.png is a file, not a folder"),
    ("empty", r"images folder .*empty holds no images \(\.png"),
    ("text-method", r"method clip works from text, not from --images: drop it from --methods"),
    ("image-method", r"method zero123 reconstructs an object from an image: pass --images DIR"),
    ("both", r"argument --prompts: not allowed with argument --images"),
])
def test_a_bad_folder_or_method_is_one_line_and_exit_2(case, message, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _disc(images / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "p.txt").write_text("a cat\n")
    source = {"missing": ["--images", str(tmp_path / "nope")], "file": ["--images", str(images / "a.png")],
              "empty": ["--images", str(tmp_path / "empty")],
              "text-method": ["--images", str(images), "--methods", "zero123,clip"],
              "image-method": ["--prompts", str(tmp_path / "p.txt"), "--methods", "zero123"],
              "both": ["--images", str(images), "--prompts", str(tmp_path / "p.txt")]}[case]
    rc = cli(["bench", *source, "--steps", "2", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"])
    assert rc == 2
    assert re.search(message, error_line(capsys.readouterr().err))
    assert not (tmp_path / "out").exists()


def test_missing_zero123_weights_offline_fail_before_any_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = tmp_path / "images"
    images.mkdir()
    _disc(images / "a.png")
    rc = cli(["bench", "--images", str(images), "--steps", "2", "--out", str(tmp_path / "out"), "--device", "cpu",
              "--model", "kxic/zero123-xl", "--quiet"])
    assert rc == 2 and "hf download kxic/zero123-xl" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "runs").exists()


def test_image_bench_scores_each_result_by_its_reference_view(tmp_path, capsys, monkeypatch, tiny_zero123,
                                                               one_thread):
    """Two images (a small and a large disc, framed alike, so told apart by colour), zero123 with the tiny
    random model, 2 steps each, trained in this process (the child's own code, without the process): every row
    holds its run's closing-record PSNR, SSIM and mask IoU; the summary their means; the progress bar and the
    list of what was written are shown; a second call skips both finished runs."""
    monkeypatch.setattr(bench_child, "spawn", lambda argv, log_path, cwd, tick: bench_child.train(*argv))
    images = tmp_path / "images"
    images.mkdir()
    _disc(images / "mug.png")
    _disc(images / "ball.png", size=(120, 120), centre=(60, 60), radius=50)
    (images / "README.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    argv = ["bench", "--images", str(images), "--steps", "2", "--out", str(out), "--device", "cpu",
            "--model", str(tiny_zero123), "--eval-views", "2", "--eval-size", "16"]
    rc = cli(argv + TINY)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "entries: 2 done, 0 running, 0 failed, 2 in all" in captured.err and "4/4 [" in captured.err
    assert re.search(r"bench: 2 runs in \d+ s; wrote .*results\.csv, .*results\.json, .*report\.md, .*report\.html",
                     captured.out)
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"]["images"] == [str((images / n).resolve()) for n in ("ball.png", "mug.png")]
    assert data["benchmark"]["evaluator"] is None and data["benchmark"]["methods"] == ["zero123"]
    rows = {r["image"]: r for r in data["runs"]}
    assert set(rows) == {"ball.png", "mug.png"}
    for name, row in rows.items():
        assert row["status"] == "done" and row["method"] == "zero123" and "prompt" not in row
        done = RunDir(out / row["run_dir"]).closing_record()
        for key in ("reference_psnr", "reference_ssim", "reference_mask_iou"):
            assert row[key] == done[key], (name, key)
        assert 0.0 <= row["reference_mask_iou"] <= 1.0 and -1.0 <= row["reference_ssim"] <= 1.0
        assert "rank_color" not in row and row["faces"] >= 0
    assert rows["ball.png"]["reference_psnr"] != rows["mug.png"]["reference_psnr"]
    summary = data["summary"][0]
    assert summary["mean_reference_psnr"] == pytest.approx(
        (rows["ball.png"]["reference_psnr"] + rows["mug.png"]["reference_psnr"]) / 2, abs=1e-3)
    assert "r_at_1_color" not in summary
    header = next(csv.reader(open(out / "results.csv")))
    assert {"image", "reference_psnr", "reference_ssim", "reference_mask_iou"} <= set(header)
    report = (out / "report.md").read_text()
    assert "2 images × 1 methods × 1 seeds" in report and "| zero123 | ball.png | 0 | done |" in report
    assert (out / "reference_view.png").is_file() and not (out / "r_precision.png").exists()
    html = (out / "report.html").read_text()
    assert "reference PSNR (dB)" in html and "2 images" in html
    assert cli(argv + ["--quiet"] + TINY) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 2
