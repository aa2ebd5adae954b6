"""The input image of image-to-3D (threed/image.py): RGBA kept, premultiplied resampling, centring and scale,
background removal through the optional extra, and one-line errors for unusable files."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from threed.errors import UserError
from threed.image import load_image, resample


def _rgba(path: Path, size=(120, 80), box=(10, 20, 50, 60), colour=(255, 0, 0), transparent_rgb=(0, 0, 0)) -> Path:
    """An RGBA PNG: an opaque `colour` rectangle box = (x0, y0, x1, y1) on transparent pixels of `transparent_rgb`."""
    a = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    a[..., :3] = transparent_rgb
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1, :3] = colour
    a[y0:y1, x0:x1, 3] = 255
    Image.fromarray(a, "RGBA").save(path)
    return path


def test_rgba_is_kept_centred_and_scaled(tmp_path: Path) -> None:
    """An off-centre 40x40 object in a 120x80 frame: its box fills 0.8 of 256 pixels, centred, colour kept."""
    ref = load_image(_rgba(tmp_path / "a.png"), size=256, border_ratio=0.2)
    assert ref.rgb.shape == (256, 256, 3) and ref.alpha.shape == (256, 256)
    ys, xs = torch.nonzero(ref.alpha > 0.5, as_tuple=True)
    side = 0.8 * 256
    assert abs((int(ys.max()) + 1 - int(ys.min())) - side) <= 2 and abs((int(xs.max()) + 1 - int(xs.min())) - side) <= 2
    centre = ((ys.float().mean() + 0.5).item(), (xs.float().mean() + 0.5).item())
    assert abs(centre[0] - 128) <= 1 and abs(centre[1] - 128) <= 1
    inside = ref.alpha > 0.99
    assert torch.allclose(ref.rgb[inside], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)
    assert float(ref.alpha[:10].max()) == 0.0  # the border is transparent


def test_border_ratio_and_aspect(tmp_path: Path) -> None:
    """A 60x20 object: the longer side fills (1 - border_ratio), the shorter keeps the aspect ratio."""
    ref = load_image(_rgba(tmp_path / "w.png", box=(30, 30, 90, 50)), size=128, border_ratio=0.5)
    ys, xs = torch.nonzero(ref.alpha > 0.5, as_tuple=True)
    assert abs((int(xs.max()) + 1 - int(xs.min())) - 64) <= 1
    assert abs((int(ys.max()) + 1 - int(ys.min())) - 64 / 3) <= 1.5


def test_premultiplied_edges(tmp_path: Path) -> None:
    """Transparent pixels are black; resampling straight colour would darken the red edge (half-covered
    pixels near 0.5 red). On premultiplied colour every pixel with any alpha stays pure red."""
    a = np.zeros((90, 90, 4), dtype=np.uint8)  # a red disc on black transparent pixels
    yy, xx = np.mgrid[:90, :90]
    disc = (yy - 41) ** 2 + (xx - 47) ** 2 < 27 ** 2
    a[disc] = (255, 0, 0, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "e.png")
    ref = load_image(tmp_path / "e.png", size=97, border_ratio=0.23)
    edge = (ref.alpha > 0.02) & (ref.alpha < 0.98)
    assert int(edge.sum()) > 10  # the scale is not whole: there are partly covered pixels
    assert torch.allclose(ref.rgb[edge], torch.tensor([1.0, 0.0, 0.0]), atol=2e-3)
    # the same resampling of straight colour, for contrast: the edge darkens
    a = torch.zeros(8, 8)
    a[:, :4] = 1.0
    rgb = torch.zeros(8, 8, 3)
    rgb[:, :4, 0] = 1.0
    straight = torch.nn.functional.interpolate(rgb.permute(2, 0, 1)[None], size=(3, 3), mode="bilinear",
                                               antialias=True)[0, 0]
    ours, alpha = resample(rgb, a, 3)
    mid = (alpha > 0.05) & (alpha < 0.95)
    assert bool(mid.any()) and torch.allclose(ours[mid][:, 0], torch.ones(int(mid.sum())), atol=1e-5)
    assert float(straight[mid].min()) < 0.9


def test_composite_and_mask(tmp_path: Path) -> None:
    ref = load_image(_rgba(tmp_path / "c.png"), size=64)
    over = ref.over((1.0, 1.0, 1.0))
    assert torch.allclose(over[0, 0], torch.ones(3))  # background white
    assert torch.allclose(over[32, 32], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)
    assert set(ref.mask().unique().tolist()) <= {0.0, 1.0}
    assert ref.mask(32).shape == (32, 32)


def test_jpeg_without_the_extra_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(path)
    monkeypatch.setitem(sys.modules, "rembg", None)  # not installed
    with pytest.raises(UserError) as e:
        load_image(path)
    msg = str(e.value)
    assert "\n" not in msg and "RGBA" in msg and "pip install 'threed[image]'" in msg


def test_opaque_png_needs_background_removal_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "opaque.png"
    Image.fromarray(np.full((40, 40, 4), 255, dtype=np.uint8), "RGBA").save(path)
    monkeypatch.setitem(sys.modules, "rembg", None)
    with pytest.raises(UserError, match="no transparent background"):
        load_image(path)


def test_jpeg_with_the_extra_is_cut_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With rembg importable its cut-out is used (a stand-in that keeps the bright square)."""
    path = tmp_path / "photo.jpg"
    a = np.zeros((60, 60, 3), dtype=np.uint8)
    a[20:40, 25:45] = 250
    Image.fromarray(a).save(path, quality=100)
    calls = []

    def remove(image, session=None):
        calls.append(session)
        rgb = np.asarray(image)
        alpha = np.where(rgb.mean(-1) > 128, 255, 0).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(new_session=lambda name: f"session:{name}",
                                                                    remove=remove))
    ref = load_image(path, size=64)
    assert calls == ["session:u2net"]
    ys, xs = torch.nonzero(ref.alpha > 0.5, as_tuple=True)
    assert abs((int(xs.max()) + 1 - int(xs.min())) - 51) <= 2  # 0.8 * 64, the box's longer side


def test_background_removal_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(path)

    def new_session(name):
        raise ConnectionError("Failed to establish a new connection: [Errno -3] Temporary failure\nmore")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(new_session=new_session, remove=None))
    with pytest.raises(UserError) as e:
        load_image(path)
    msg = str(e.value)
    assert "\n" not in msg and "u2net" in msg and "internet" in msg and "RGBA" in msg


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"not an image at all", "cannot read image"),
    (None, "not found"),
])
def test_unusable_files(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=expected) as e:
        load_image(path)
    assert "\n" not in str(e.value)


def test_truncated_png(tmp_path: Path) -> None:
    good = tmp_path / "g.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot read image"):
        load_image(cut)


def test_fully_transparent(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    a = np.zeros((20, 20, 4), dtype=np.uint8)
    a[0, 0, 3] = 1  # has transparency, but ...
    Image.fromarray(a, "RGBA").save(path)
    a[0, 0, 3] = 0
    Image.fromarray(a, "RGBA").save(path)
    with pytest.raises(UserError, match="fully transparent"):
        load_image(path)


def test_text_methods_take_no_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from threed.cli import main

    image = _rgba(tmp_path / "a.png")
    code = main(["run", "--method", "dreamfusion", "--prompt", "a cup", "--image", str(image), "--out",
                 str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--image" in err and "from text" in err
    assert not (tmp_path / "run").exists()


def test_reference_view_metrics_by_hand() -> None:
    """Uniform images 0.5 and 0.6: MSE 0.01, PSNR 20 dB; SSIM (no variance) (2 0.3 + 1e-4) / (0.61 + 1e-4)
    = 0.98361; masks of 4 and 4 pixels sharing 2: IoU 2 / 6."""
    from threed.image_metrics import mask_iou, psnr, ssim

    a, b = torch.full((16, 16, 3), 0.5), torch.full((16, 16, 3), 0.6)
    assert abs(psnr(a, b) - 20.0) < 1e-4
    assert abs(ssim(a, b) - 0.6001 / 0.6101) < 1e-5 and ssim(a, a) == pytest.approx(1.0)
    m1, m2 = torch.zeros(4, 4), torch.zeros(4, 4)
    m1[0, :4] = 1.0
    m2[0, 2:] = 1.0
    m2[1, :2] = 1.0
    assert mask_iou(m1, m2) == pytest.approx(2 / 6)
