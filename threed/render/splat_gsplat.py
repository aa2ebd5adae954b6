"""The gsplat backend of the Gaussian rasterizer: gsplat's CUDA kernels (`pip install 'threed[gsplat]'`) with
the conventions of threed's own PyTorch rasterizer (threed/render/splat.py), so the two are interchangeable.

gsplat's cameras are OpenCV's (x right, y down, looking along +z), threed's OpenGL's (y up, looking along -z):
the world-to-camera matrix is threed's with its y and z rows negated, and the intrinsics put the square-pixel
focal 0.5 H / tan(fovy / 2) on both axes and the principal point at (W / 2, H / 2). gsplat evaluates pixel
(i, j) at (i + 0.5, j + 0.5), as threed does, so the same point lands on the same pixel. The compositing
rules (skipped below α = 1/255, stop before T < 1e-4, 0.3 px² dilation, 1.3x frustum clamp of the Jacobian)
are gsplat's "classic" mode's and threed's alike, with one difference in gsplat's releases up to 1.5.3: their
kernels clamp α at 0.999 where 3DGS and threed clamp at 0.99 (gsplat's development sources have 0.99 since),
so a nearly opaque splat's centre lets 0.1% through instead of 1%. Which Gaussians a pixel considers also
differs slightly: gsplat's box reaches min(3.33 σ, the α = 1/255 level) per axis, threed's the α = 1/255
level inside the blocks its 3σ box touches, so a Gaussian of opacity above exp(4.5)/255 ≈ 0.35 may reach a
few pixels with α ≤ 0.011 under gsplat that it does not under threed. gsplat's background is one colour per
view, so the per-pixel background is composited here, C + (1 - α) · background, as threed's path does; depth
is gsplat's accumulated z ("RGB+D"), threed's Σ w_i depth_i.

gsplat is imported only when a run on CUDA chooses it: its first use may compile its CUDA kernels (minutes,
cached afterwards), which is announced once with the time it took; CPU tensors never reach it.
"""

from __future__ import annotations

import time
import types

import torch
from torch import Tensor

from threed.accelerators import importable_for
from threed.errors import UserError, first_line
from threed.render.splat import DILATION, SplatOutput, focal_length

INSTALL_HINT = "pip install 'threed[gsplat]'"
_kernels_ready = False
_kernels_error = ""  # why the kernels could not load, once that is known


def gsplat_available(device: torch.device | str) -> bool:
    """gsplat imports and `device` is CUDA (its kernels on CPU tensors would try to JIT-build)."""
    return importable_for(device, "gsplat")


def choose_backend(want: str, device: torch.device | str) -> str:
    """gaussians.backend -> the rasterizer used: `auto` is gsplat on CUDA when importable (and its kernels load),
    else torch; an explicit gsplat that cannot run is one line naming the fix. Loads gsplat's kernels when
    chosen, so their first-use build happens (and is timed) here, not inside the first training step."""
    if want == "torch":
        return "torch"
    if want == "gsplat":
        if torch.device(device).type != "cuda":
            raise UserError(f"gaussians.backend=gsplat needs a CUDA device (this run is on {torch.device(device)}): "
                            f"pass gaussians.backend=torch (or auto)")
        if not gsplat_available(device):
            raise UserError(f"gaussians.backend=gsplat needs gsplat: {INSTALL_HINT}, or pass "
                            f"gaussians.backend=torch (or auto)")
        ensure_kernels()
        return "gsplat"
    if want == "auto":
        if not gsplat_available(device):
            return "torch"
        try:
            ensure_kernels()
        except UserError as e:
            print(f"{e}; using threed's PyTorch rasterizer", flush=True)
            return "torch"
        return "gsplat"
    raise UserError(f"unknown gaussians.backend {want!r}; use auto, torch or gsplat")


def ensure_kernels() -> None:
    """Load gsplat's CUDA extension once per process (compiling it on the very first use), saying how long it
    took; a build that fails is one line, and is not tried again in the same process."""
    global _kernels_ready, _kernels_error
    if _kernels_ready:
        return
    if _kernels_error:
        raise UserError(_kernels_error)
    start = time.perf_counter()
    try:
        from gsplat.cuda import _backend  # accelerator: builds or loads the extension when first imported
        built = getattr(_backend, "_C", None) is not None
        _kernels_error = "" if built else ("gsplat found no CUDA toolkit to build its kernels: install one (nvcc), "
                                           "or pass gaussians.backend=torch")
    except Exception as e:  # a failed extension build raises whatever its compiler step raised
        _kernels_error = (f"gsplat's CUDA kernels could not be built or loaded ({first_line(e)}): check the CUDA "
                          f"toolkit, or pass gaussians.backend=torch")
    if _kernels_error:
        raise UserError(_kernels_error)
    print(f"gsplat: CUDA kernels ready in {time.perf_counter() - start:.1f} s (built on first use, cached "
          f"afterwards)", flush=True)
    _kernels_ready = True


def gsplat_module(device: torch.device) -> types.ModuleType:
    """gsplat, for tensors on `device`: CUDA only (on CPU tensors its kernels would try to build), kernels loaded."""
    if device.type != "cuda":
        raise UserError("the gsplat rasterizer runs on CUDA only: pass gaussians.backend=torch")
    ensure_kernels()
    import gsplat  # accelerator: imported only when chosen

    return gsplat


def opencv_cameras(c2w: Tensor, fovy: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """threed's (B, 4, 4) camera-to-world (OpenGL) and (B,) fovy -> gsplat's (B, 4, 4) world-to-camera
    `viewmats` (OpenCV) and (B, 3, 3) intrinsics `Ks`."""
    w2c = torch.linalg.inv(c2w)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    viewmats = flip @ w2c
    ks = torch.zeros(c2w.shape[0], 3, 3, dtype=c2w.dtype, device=c2w.device)
    ks[:, 0, 0] = ks[:, 1, 1] = focal_length(fovy.to(c2w.device, c2w.dtype), height)
    ks[:, 0, 2], ks[:, 1, 2], ks[:, 2, 2] = 0.5 * width, 0.5 * height, 1.0
    return viewmats, ks


def render(means: Tensor, scales: Tensor, quaternions: Tensor, opacities: Tensor, colors: Tensor, c2w: Tensor,
           fovy: Tensor, width: int, height: int, background: Tensor, near: float = 0.01) -> SplatOutput:
    """threed.render.splat.render's outputs from gsplat (`colors` (N, 3) or, per view, (B, N, 3): gsplat takes
    both): (B, H, W, 3) colour over `background`, (B, H, W, 1) opacity and accumulated depth, the (B, N, 2)
    pixel means (their gradient kept after backward, for densification) and (B, N) radii (0: culled)."""
    gsplat = gsplat_module(means.device)
    viewmats, ks = opencv_cameras(c2w.to(means.device, torch.float32), fovy, width, height)
    image, alpha, meta = gsplat.rasterization(
        means.float(), quaternions.float(), scales.float(), opacities.float(), colors.float(), viewmats, ks,
        width, height, near_plane=near, eps2d=DILATION, packed=False, render_mode="RGB+D",
        rasterize_mode="classic", backgrounds=None)
    means2d = meta["means2d"]  # (B, N, 2) pixels, packed=False
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"]
    if radii.dim() == 3:  # gsplat >= 1.5: a radius per image axis
        radii = radii.amax(dim=-1)
    dtype = means.dtype
    rgb = image[..., :3].to(dtype) + (1.0 - alpha.to(dtype)) * background
    return SplatOutput(rgb, alpha.to(dtype), image[..., 3:].to(dtype), means2d, radii.long())
