"""Run the Khronos glTF-Validator (Node.js) on a file from tests.

Install once:  npm install --prefix tests/.node gltf-validator@2.0.0-dev.3.10
Without Node or the package the validator tests are skipped, unless THREED_REQUIRE_GLTF_VALIDATOR=1
(CI) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "gltf_validator.mjs"
PACKAGE = HERE / ".node" / "node_modules" / "gltf-validator"
INSTALL = "npm install --prefix tests/.node gltf-validator@2.0.0-dev.3.10"


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not PACKAGE.is_dir() and not os.environ.get("GLTF_VALIDATOR_DIR"):
        return f"gltf-validator is not installed: run `{INSTALL}`"
    return None


def require_validator() -> None:
    """Skip (or fail under THREED_REQUIRE_GLTF_VALIDATOR=1) when the validator cannot run."""
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("THREED_REQUIRE_GLTF_VALIDATOR") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def validate_gltf(path: Path | str) -> dict:
    """The validator's JSON report for `path` (see report["issues"]["numErrors"], ["messages"])."""
    require_validator()
    result = subprocess.run(["node", str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"gltf-validator failed to run: {result.stderr.strip()}")
    return json.loads(result.stdout)
