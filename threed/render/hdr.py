"""Radiance RGBE (.hdr) images: read and write, in numpy.

Environment maps for image-based lighting (threed/render/ibl.py) come as Radiance .hdr files. imageio reads
them only through FreeImage (a binary it downloads on first use) or OpenCV, neither of which threed depends
on, and the format is small: a text header, a resolution line, then one RGBE scanline per row, each either
flat (4 bytes a pixel) or run-length encoded channel by channel ("new" RLE: a scanline starts 2 2 hi lo).
A pixel's value is (mantissa + 0.5) * 2^(exponent - 136); exponent 0 is black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from threed.errors import UserError


def _parse_header(data: bytes, name: str) -> tuple[int, int, int, bool, bool]:
    """(height, width, offset of the pixels, rows stored bottom-up, columns stored right-to-left)."""
    if not (data.startswith(b"#?RADIANCE") or data.startswith(b"#?RGBE")):
        raise UserError(f"{name} is not a Radiance .hdr image (no #?RADIANCE header): pass an equirectangular "
                        ".hdr environment map")
    end = data.find(b"\n\n")
    if end < 0:
        raise UserError(f"{name} has a truncated Radiance header: pass a complete .hdr file")
    for line in data[:end].split(b"\n"):
        if line.startswith(b"FORMAT=") and line.strip() != b"FORMAT=32-bit_rle_rgbe":
            raise UserError(f"{name} stores {line[7:].decode(errors='replace')} pixels; only RGBE (32-bit_rle_rgbe) "
                            "is read: convert it to RGBE")
    nl = data.find(b"\n", end + 2)
    parts = data[end + 2:nl].split() if nl > 0 else []
    if len(parts) != 4 or parts[0][1:] != b"Y" or parts[2][1:] != b"X":
        raise UserError(f"{name} has an unsupported resolution line (only -Y H +X W layouts): re-save it as a "
                        "standard .hdr")
    try:
        height, width = int(parts[1]), int(parts[3])
    except ValueError:
        raise UserError(f"{name} has an unreadable resolution line: pass a valid .hdr file") from None
    if height <= 0 or width <= 0:
        raise UserError(f"{name} is empty ({width}x{height}): pass a valid .hdr file")
    return height, width, nl + 1, parts[0][:1] == b"+", parts[2][:1] == b"-"


def _scanline(buf: memoryview, pos: int, width: int, name: str) -> tuple[np.ndarray, int]:
    """One scanline as (width, 4) uint8 RGBE, and the position after it."""
    if pos + 4 > len(buf):
        raise UserError(f"{name} is truncated: pass a complete .hdr file")
    head = bytes(buf[pos:pos + 4])
    if not (8 <= width < 32768 and head[0] == 2 and head[1] == 2 and head[2] < 128):
        if head[:3] == b"\x01\x01\x01":
            raise UserError(f"{name} uses the old Radiance run-length encoding: re-save it (any current tool "
                            "writes the new one)")
        end = pos + 4 * width
        if end > len(buf):
            raise UserError(f"{name} is truncated: pass a complete .hdr file")
        return np.frombuffer(buf[pos:end], dtype=np.uint8).reshape(width, 4), end
    if (head[2] << 8 | head[3]) != width:
        raise UserError(f"{name} has a scanline of the wrong length: pass a valid .hdr file")
    pos += 4
    out = np.empty((4, width), dtype=np.uint8)
    for channel in range(4):
        x = 0
        while x < width:
            if pos >= len(buf):
                raise UserError(f"{name} is truncated: pass a complete .hdr file")
            count = buf[pos]
            pos += 1
            if count > 128:  # a run of one value
                count -= 128
                if x + count > width:
                    raise UserError(f"{name} has a corrupt scanline: pass a valid .hdr file")
                if pos >= len(buf):
                    raise UserError(f"{name} is truncated: pass a complete .hdr file")
                out[channel, x:x + count] = buf[pos]
                pos += 1
            else:  # literal bytes
                if count == 0 or x + count > width:
                    raise UserError(f"{name} has a corrupt scanline: pass a valid .hdr file")
                if pos + count > len(buf):
                    raise UserError(f"{name} is truncated: pass a complete .hdr file")
                out[channel, x:x + count] = np.frombuffer(buf[pos:pos + count], dtype=np.uint8)
                pos += count
            x += count
    return out.T, pos


def read_hdr(path: Path | str) -> np.ndarray:
    """An (H, W, 3) float32 linear-radiance image from a Radiance .hdr file, row 0 at the top. Any problem
    (missing, unreadable, not RGBE, truncated) is one UserError line naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the environment map {path} ({e.strerror or e}): pass an existing .hdr "
                        "file") from None
    name = f"the environment map {path}"
    height, width, pos, bottom_up, right_left = _parse_header(data, name)
    buf = memoryview(data)
    rgbe = np.empty((height, width, 4), dtype=np.uint8)
    for row in range(height):
        rgbe[row], pos = _scanline(buf, pos, width, name)
    exponent = rgbe[..., 3:4].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    image = ((rgbe[..., :3].astype(np.float64) + 0.5) * scale).astype(np.float32)
    if bottom_up:
        image = image[::-1]
    if right_left:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def rgbe_bytes(image: np.ndarray) -> bytes:
    """A Radiance .hdr file holding `image` (H, W, 3) non-negative floats, run-length encoded scanlines
    (literal runs only where a scanline may be encoded; flat otherwise)."""
    image = np.asarray(image, dtype=np.float64)
    height, width = image.shape[:2]
    peak = image.max(axis=-1)
    mantissa, exponent = np.frexp(peak)  # peak = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = np.where(peak > 1e-32, mantissa * 256.0 / np.where(peak > 1e-32, peak, 1.0), 0.0)
    rgb = np.clip(np.floor(image * scale[..., None]), 0, 255).astype(np.uint8)
    e = np.where(peak > 1e-32, exponent + 128, 0).astype(np.uint8)
    rgbe = np.concatenate([rgb, e[..., None]], axis=-1)
    out = [b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n", f"-Y {height} +X {width}\n".encode()]
    for row in rgbe:
        if 8 <= width < 32768:
            out.append(bytes([2, 2, width >> 8, width & 255]))
            for channel in range(4):
                values = row[:, channel].tobytes()
                for start in range(0, width, 128):
                    chunk = values[start:start + 128]
                    out.append(bytes([len(chunk)]) + chunk)
        else:
            out.append(row.tobytes())
    return b"".join(out)


def write_hdr(path: Path | str, image: np.ndarray) -> Path:
    """Write `image` (H, W, 3) linear radiance as a Radiance .hdr file; returns `path`."""
    from exporters.atomic import atomic_write_bytes

    return atomic_write_bytes(path, rgbe_bytes(image))
