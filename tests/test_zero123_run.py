"""`threed run --image`: the reference camera frames the object as the input image does, a tiny Zero123 run
end to end with its preview and report, resume, and the one-line errors before any model loads."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from threed import raycast
from threed.cli import main
from threed.config import build_config
from threed.image import load_image
from threed.random_models import build_zero123
from threed.scenes.reference import reference_camera


def _disc(path: Path, size=(200, 150), centre=(60, 90), radius=30) -> Path:
    """An RGBA image of an orange disc, off-centre, on transparent pixels."""
    yy, xx = np.mgrid[:size[1], :size[0]]
    inside = (xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 < radius ** 2
    a = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    a[inside] = (230, 140, 30, 255)
    Image.fromarray(a, "RGBA").save(path)
    return path


def test_reference_camera_reproduces_the_input_framing(tmp_path: Path) -> None:
    """A disc anywhere in a photo becomes, once framed (0.8 of 128 pixels, centred), the silhouette the
    reference camera (image.*: 3.8 away, 20 degrees) sees of a sphere at the origin whose silhouette fills 0.8 of
    its frame: radius 3.8 sin(atan(0.8 tan 10 deg)) = 0.5308. Measured IoU 0.987 at 128 pixels (0.984 at 256:
    the icosphere's facets); the framing moved by one pixel gives 0.973, the disc two pixels wider 0.960."""
    cfg = build_config(None, ["image.elevation=5.0", "image.distance=3.8", "image.fovy=20.0"])
    framed = load_image(_disc(tmp_path / "disc.png"), size=128, border_ratio=0.2).alpha > 0.5
    radius = cfg.image.distance * math.sin(math.atan(0.8 * math.tan(math.radians(cfg.image.fovy / 2))))
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    v = torch.tensor(np.asarray(sphere.vertices), dtype=torch.float32)
    f = torch.tensor(np.asarray(sphere.faces))
    hit = raycast.render_mesh(v, f, torch.ones_like(v), reference_camera(cfg.image, 128), "albedo", 1.0,
                              torch.zeros(1, 128, 128, 3))[0, ..., 0] > 0.5
    iou = float((framed & hit).sum()) / float((framed | hit).sum())
    assert iou > 0.98, iou


@pytest.fixture(scope="module")
def tiny_zero123(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zero123(tmp_path_factory.mktemp("tiny") / "zero123", seed=0)


TINY = ["guidance.zero123.resolution=32", "image.size=64", "image.sizes=[[0, 24]]", "render.progressive=[[0, 16, 2]]",
        "export.resolution=24", "export.video=false", "export.preview_views=1", "export.video_resolution=32", "export.threshold=5",
        "export.formats=[obj, glb]", "checkpoint_every=2", "log_every=1", "render.num_samples=24",
        "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64", "field.hidden_dim=16"]


def test_image_to_3d_end_to_end_and_resume(tmp_path: Path, tiny_zero123: Path, capsys: pytest.CaptureFixture) -> None:
    image = _disc(tmp_path / "mug.png")
    out = tmp_path / "run"
    code = main(["run", "--image", str(image), "--model", str(tiny_zero123), "--device", "cpu", "--steps", "3",
                 "--out", str(out), "--quiet", *TINY])
    text = capsys.readouterr()
    assert code == 0, text.err
    cfg = build_config(base=__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.method == "zero123" and cfg.guidance.type == "zero123" and Path(cfg.image.path) == image.resolve()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss_rgb" in r]
    assert trained and all(r["loss_rgb"] > 0 and r["loss_mask"] > 0 and np.isfinite(r["loss"]) for r in trained)
    assert records[-1]["done"] and records[-1]["step"] == 3
    assert 0.0 <= records[-1]["reference_mask_iou"] <= 1.0 and np.isfinite(records[-1]["reference_psnr"])
    assert -1.0 <= records[-1]["reference_ssim"] <= 1.0
    # the preview's first row: the input image (framed, over the white background) beside the reference render
    preview = np.asarray(Image.open(out / "preview.png").convert("RGB"))
    assert preview.shape[:2] == (2 * 32, 2 * 32)  # [input, reference view], [colour, textureless]
    shown = load_image(image, size=64).over((1.0, 1.0, 1.0), 32)
    assert np.abs(preview[:32, :32].astype(float) / 255 - shown.numpy()).max() < 0.01
    assert "the input image and the render from the reference camera" in (out / "report.html").read_text()
    # resume: two more steps from the checkpoint at step 2 (a copy of the input image is not needed again)
    code = main(["run", "--resume", str(out), "--steps", "5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["done"] and records[-1]["step"] == 5
    assert any(r.get("step") == 4 and "loss_rgb" in r for r in records)
    # re-exporting needs no input image (it may have moved since)
    image.rename(tmp_path / "elsewhere.png")
    assert main(["export", str(out), "--format", "obj", "--resolution", "16", "--device", "cpu"]) == 0


def test_bad_image_stops_before_the_model_loads(tmp_path: Path, tiny_zero123: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(photo)
    monkeypatch.setitem(sys.modules, "rembg", None)
    for args, expected in ((["--image", str(photo)], "pip install 'threed[image]'"),
                           (["--image", str(tmp_path / "none.png")], "not found"),
                           (["--method", "zero123"], "pass --image")):
        code = main(["run", *args, "--model", "kxic/zero123-xl", "--device", "cpu", "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "r").exists()


def test_offline_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "--image", str(_disc(tmp_path / "a.png")), "--model", "kxic/zero123-xl", "--device", "cpu",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "hf download kxic/zero123-xl" in err
    assert not (tmp_path / "r").exists()


def test_image_with_the_oracle_takes_the_oracle_preset(tmp_path: Path) -> None:
    """`threed run --image IMG --guidance oracle --reference MESH`: image-to-3D's oracle preset, whose image is
    not re-framed (it is the mesh seen from the reference camera)."""
    from threed import spec

    mesh = tmp_path / "m.ply"
    trimesh.creation.icosphere(subdivisions=1, radius=0.4).export(mesh)
    opts = spec.RunOptions(image=str(_disc(tmp_path / "a.png")), guidance="oracle", reference=str(mesh))
    cfg, _ = spec.resolve(opts, cuda=False)
    assert (cfg.method, cfg.guidance.type, cfg.image.recentre) == ("zero123", "oracle", False)
    assert Path(cfg.guidance.oracle.reference) == mesh.resolve()
