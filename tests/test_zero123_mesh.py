"""zero123-mesh and zero123-refine: Magic3D's mesh stage after image-to-3D's NeRF, the reference view's RGB and
mask losses kept in the mesh stage (threed/scenes/reference.py, ReferenceViewMeshScene), end to end with a tiny
random Zero123, and the refine of an existing run's NeRF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_zero123_run import TINY, _disc  # tests/ is on sys.path (conftest.py)
from threed.cli import main
from threed.config import build_config
from threed.random_models import build_zero123

TINY_MESH = ["mesh.steps=2", "mesh.resolution=12", "mesh.width=24", "mesh.height=24", "export.texture=false"]


@pytest.fixture(scope="module")
def tiny_zero123(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zero123(tmp_path_factory.mktemp("tiny") / "zero123", seed=0)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_presets_are_zero123_s_nerf_and_magic3d_s_mesh_stage_with_zero123_s_cameras():
    nerf, mesh, magic3d = build_config("zero123"), build_config("zero123-mesh"), build_config("magic3d")
    assert mesh.method == "zero123-mesh" and mesh.loss == nerf.loss and mesh.image == nerf.image
    assert mesh.steps == nerf.steps and mesh.render == nerf.render and mesh.guidance == nerf.guidance
    for key in ("steps", "resolution", "width", "height", "t_min", "t_max", "lr_sdf", "lr_texture", "loss"):
        assert getattr(mesh.mesh, key) == getattr(magic3d.mesh, key), key
    assert mesh.mesh.distance == (3.8, 3.8) and mesh.mesh.fovy == (20.0, 20.0) and mesh.mesh.shading == "albedo"


def test_zero123_mesh_end_to_end_keeps_the_reference_view_and_refines_another_run(
        tmp_path: Path, tiny_zero123: Path, capsys: pytest.CaptureFixture) -> None:
    """Two NeRF steps, two mesh steps: the mesh stage's records carry the reference view's RGB and mask losses
    beside the mesh's own normal consistency; the run ends with the reference view's scores of the mesh, its
    kept NeRF mesh and the preview's input row. `zero123-refine --from` that run trains the mesh stage again from
    its NeRF checkpoint, the reference losses kept."""
    torch.set_num_threads(1)
    image = _disc(tmp_path / "mug.png")
    run = tmp_path / "run"
    code = main(["run", "--image", str(image), "--method", "zero123-mesh", "--model", str(tiny_zero123),
                 "--device", "cpu", "--steps", "2", "--out", str(run), "--quiet", *TINY, *TINY_MESH])
    assert code == 0, capsys.readouterr().err
    got = records(run)
    mesh_steps = [r for r in got if r.get("stage") == "mesh" and "loss_rgb" in r]
    assert mesh_steps and all(r["loss_rgb"] > 0 and r["loss_mask"] > 0 and "loss_normal_consistency" in r
                              for r in mesh_steps)
    assert not any("loss_ref_orient" in r for r in mesh_steps)  # a NeRF's regularisers, not a mesh's
    done = got[-1]
    assert done["done"] and done["step"] == 4 and 0.0 <= done["reference_mask_iou"] <= 1.0
    assert np.isfinite(done["reference_psnr"])
    assert (run / "mesh-nerf.obj").is_file() and (run / "mesh.obj").is_file()
    refined = tmp_path / "refined"
    code = main(["run", "--method", "zero123-refine", "--from", str(run), "--out", str(refined), "--quiet",
                 "--device", "cpu", *TINY_MESH])
    assert code == 0, capsys.readouterr().err
    got = records(refined)
    assert any(r.get("stage") == "mesh" and r.get("loss_rgb", 0) > 0 for r in got)
    assert got[-1]["done"] and "reference_psnr" in got[-1] and (refined / "mesh.obj").is_file()
