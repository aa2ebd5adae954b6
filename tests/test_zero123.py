"""The Zero-1-to-3 prior (threed/guidance/zero123.py, zero123_model.py): both layouts load to the same networks,
the relative camera against hand-computed values, and the offline errors."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from threed.cameras import make_cameras
from threed.config import build_config
from threed.errors import UserError
from threed.guidance.zero123 import Zero123Guidance, relative_camera
from threed.guidance.zero123_model import load_zero123
from threed.random_models import build_zero123, tiny_zero123_ldm_config
from zero123_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zero123")
    folder = build_zero123(root / "diffusers", seed=3)
    ldm = tiny_zero123_ldm_config()
    (root / "tiny.yaml").write_text(yaml.safe_dump(ldm))
    ckpt = write_checkpoint(folder, root / "tiny_zero123.ckpt", ldm)
    image = np.zeros((48, 48, 4), dtype=np.uint8)
    image[10:38, 14:34] = (200, 120, 40, 255)
    Image.fromarray(image, "RGBA").save(root / "object.png")
    return {"folder": folder, "ckpt": ckpt, "yaml": root / "tiny.yaml", "image": root / "object.png"}


def test_relative_camera_by_hand() -> None:
    """Elevation 30 vs the reference's 5: the polar angle (90 - elevation) is 25 degrees smaller, -0.43633 rad;
    azimuth 90 vs 0: sin 1, cos 0; distance 4.0 vs 3.8: +0.2 (Zero123), or the reference's polar angle 85
    degrees = 1.48353 rad (Stable Zero123)."""
    el, az, d = torch.tensor([30.0, 5.0]), torch.tensor([90.0, 0.0]), torch.tensor([4.0, 3.8])
    z = relative_camera(el, az, d, 5.0, 0.0, 3.8, "zero123")
    assert torch.allclose(z[0], torch.tensor([-0.436332, 1.0, 0.0, 0.2]), atol=1e-5)
    assert torch.allclose(z[1], torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-6)  # the reference view itself
    s = relative_camera(el, az, d, 5.0, 0.0, 3.8, "stable")
    assert torch.allclose(s[:, 3], torch.full((2,), 1.483530), atol=1e-5)
    assert torch.allclose(s[:, :3], z[:, :3])


def test_relative_camera_azimuth_wrap_and_sign() -> None:
    """-170 vs a reference at 170 is 20 degrees on (counter-clockwise): sin 0.34202, cos 0.93969, the same as
    190 vs 170; degrees in, radians in the angle: a view 1 degree lower has polar +0.0174533."""
    a = relative_camera(torch.tensor([0.0]), torch.tensor([-170.0]), torch.ones(1), 0.0, 170.0, 1.0, "zero123")
    b = relative_camera(torch.tensor([0.0]), torch.tensor([190.0]), torch.ones(1), 0.0, 170.0, 1.0, "zero123")
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a[0, 1:3], torch.tensor([math.sin(math.radians(20)), math.cos(math.radians(20))]), atol=1e-6)
    lower = relative_camera(torch.tensor([-1.0]), torch.zeros(1), torch.ones(1), 0.0, 0.0, 1.0, "zero123")
    assert abs(float(lower[0, 0]) - math.radians(1.0)) < 1e-7


def test_threed_azimuth_turns_as_zero123s() -> None:
    """Zero123 (and threestudio) measure azimuth counter-clockwise seen from above, in a z-up frame; threed's
    cameras (y up) must turn the same way, or every novel view would be mirrored: a camera at +90 degrees of
    azimuth sits a quarter turn counter-clockwise of the one at 0, seen from above (+y)."""
    cams = make_cameras(torch.zeros(2), torch.tensor([0.0, 90.0]), torch.ones(2), torch.full((2,), 40.0), 8, 8)
    p0, p1 = cams.position[0], cams.position[1]
    up = torch.tensor([0.0, 1.0, 0.0])
    assert float(torch.dot(torch.cross(p0, p1, dim=0), up)) > 0.99  # counter-clockwise about +y


def _cfg(tiny: dict[str, Path], model: str, **extra: str) -> object:
    overrides = ["method=dreamfusion", "guidance.type=zero123", f"guidance.zero123.model={model}",
                 f"image.path={tiny['image']}", "guidance.zero123.resolution=32", "image.size=32", "seed=1"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return build_config(None, overrides)


def test_diffusers_and_checkpoint_layouts_load_the_same_model(tiny: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny random Zero123 in the diffusers layout and the same weights as a latent-diffusion checkpoint
    (paired with the folder's image encoder) load to the same networks and give the same SDS loss."""
    a = load_zero123(str(tiny["folder"]))
    b = load_zero123(str(tiny["ckpt"]), image_encoder=str(tiny["folder"] / "image_encoder"), config=str(tiny["yaml"]))
    assert type(a.unet) is type(b.unet) and a.unet.config.in_channels == b.unet.config.in_channels == 8
    for name in ("unet", "vae", "projection"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key].reshape(sa[key].shape)), f"{name}: {key}"
    assert torch.allclose(a.alphas_cumprod, b.alphas_cumprod, atol=1e-6)
    cfg = _cfg(tiny, str(tiny["folder"]))
    rgb = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    cams = make_cameras(torch.tensor([20.0, -5.0]), torch.tensor([45.0, 200.0]), torch.full((2,), 3.8),
                        torch.full((2,), 20.0), 16, 16)
    out = []
    for parts in (a, b):
        monkeypatch.setattr("threed.guidance.zero123.load_zero123", lambda *args, parts=parts: parts)
        out.append(Zero123Guidance(cfg, "cpu")(rgb, cams, 0))
    assert float(out[0]["loss"]) > 0
    assert torch.allclose(out[0]["loss"], out[1]["loss"], rtol=1e-5), (out[0]["loss"], out[1]["loss"])


def test_sds_gradient_reaches_the_render(tiny: dict[str, Path]) -> None:
    guidance = Zero123Guidance(_cfg(tiny, str(tiny["folder"])), "cpu")
    rgb = torch.rand(1, 16, 16, 3, requires_grad=True)
    cams = make_cameras(torch.tensor([10.0]), torch.tensor([90.0]), torch.tensor([3.8]), torch.tensor([20.0]), 16, 16)
    out = guidance(rgb, cams, 0)
    out["loss"].backward()
    assert rgb.grad is not None and float(rgb.grad.abs().sum()) > 0
    assert 0.0 < float(out["t"]) < 1.0


def test_camera_projection_of_either_name(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Stable Zero123's diffusers copies name the projection clip_camera_projection (key `proj`)."""
    folder = build_zero123(tmp_path / "stable", seed=3, projection="clip_camera_projection")
    parts = load_zero123(str(folder))
    assert parts.projection.in_features == 36 and parts.projection.out_features == 32


def test_offline_and_missing_paths_fail_in_seconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_zero123("kxic/zero123-xl")
    assert "hf download kxic/zero123-xl" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_zero123(str(tmp_path / "stable_zero123.ckpt"))
    with pytest.raises(UserError, match="does not exist"):
        load_zero123(str(tmp_path / "no-such-folder") + "/")
    assert time.perf_counter() - start < 10


def test_checkpoint_names_the_image_encoder_to_download(tiny: dict[str, Path]) -> None:
    """A checkpoint holds no CLIP image encoder in diffusers' form: offline, the one it needs is named."""
    with pytest.raises(UserError) as e:
        load_zero123(str(tiny["ckpt"]), config=str(tiny["yaml"]))
    assert "openai/clip-vit-large-patch14" in str(e.value)


def test_not_a_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(UserError, match="not a latent-diffusion checkpoint"):
        load_zero123(str(bad), image_encoder=str(tiny["folder"] / "image_encoder"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="cannot read the Zero123 checkpoint"):
        load_zero123(str(broken), image_encoder=str(tiny["folder"] / "image_encoder"))
