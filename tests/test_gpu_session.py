"""examples/gpu_session.py's dry run: the GPU measurement session's plan, on a CPU with tiny models.

A GPU machine is lent rarely and for minutes; a session script that fails there wastes it. This runs the parts
that measure what has never been measured on a GPU (the mesh stage, ProlificDreamer's VSD step and its three
stages, DreamGaussian's text and image runs, the end-to-end run) exactly as the session plans them, with its
dry-run sizes, and checks that each one ran and that its numbers reached the results and the summary table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEPT = ("m-mesh-stage", "v-vsd", "p-prolificdreamer", "s-dreamgaussian", "s-zero123-build", "s-dreamgaussian-image",
        "f-end-to-end")


@pytest.mark.slow(minutes=1.7)  # 89 s for the dry run itself, 102 s as this test, on the 2-core machine alone
def test_the_gpu_sessions_priority_parts_run_in_its_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # the budget is the CPU's, not the GPU's: a loaded CI machine must not skip parts for want of time
    cmd = [sys.executable, "examples/gpu_session.py", "--dry-run", "--out", str(out), "--work", str(work),
           "--budget", "1800", "--skip", "a,b,e,g,mv,fa,z,c,d"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    failed = {name: parts.get(name, {}).get("status", "absent") for name in KEPT
              if parts.get(name, {}).get("status") != "ok"}
    assert not failed, f"{failed}; see {(out / 'log.txt').read_text()[-4000:]}"
    assert set(parts) == {"setup-probe", "build", *KEPT}  # the skipped parts did not run
    # each measuring part's numbers reached the results
    assert parts["m-mesh-stage"]["result"]["render"] == "64x64"
    for name in ("p-prolificdreamer", "s-dreamgaussian", "s-dreamgaussian-image"):
        record = parts[name]["result"]
        assert record["done"] and record["it_per_s"] > 0 and record["peak_memory_mb"] > 0, name
    for stage in ("nerf", "geometry", "texture"):
        assert parts["p-prolificdreamer"]["result"][f"{stage}_it_per_s"] > 0, stage
    for stage in ("gaussians", "texture"):
        assert parts["s-dreamgaussian"]["result"][f"{stage}_it_per_s"] > 0, stage
    assert parts["f-end-to-end"]["result"]["final"]
    assert results["dreamgaussian_backend"] == "torch"  # no CUDA: gsplat's kernels are never built here
    # ... and the table the session prints last
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary
    for name in KEPT:
        assert f"\n{name} | ok | " in summary, name
    gaussian_row = next(ln for ln in summary.splitlines() if ln.startswith("gaussians | "))
    assert gaussian_row.split(" | ")[2] == str(parts["s-dreamgaussian"]["result"]["gaussians_it_per_s"])
