"""Cameras on a sphere looking at the origin (training cameras optionally perturbed), and their rays.

Scene frame: y is up and the object's front faces +z (the glTF convention), so exported meshes open
upright in viewers. Azimuth 0 looks from +z, azimuth 90 from +x; elevation is above the xz-plane.
Camera frame: OpenGL (looks along -z, y up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from threed.config import CameraConfig, RenderConfig


@dataclass
class Cameras:
    c2w: Tensor  # (B, 4, 4) camera-to-world
    fovy: Tensor  # (B,) radians
    elevation: Tensor  # (B,) degrees
    azimuth: Tensor  # (B,) degrees, in [-180, 180)
    distance: Tensor  # (B,)
    light_position: Tensor  # (B, 3) point light for Lambertian shading
    width: int
    height: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def position(self) -> Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.elevation.to(device),
                       self.azimuth.to(device), self.distance.to(device), self.light_position.to(device),
                       self.width, self.height)

    def rays(self) -> tuple[Tensor, Tensor]:
        """Per-pixel ray origins and unit directions, each (B, H, W, 3), through pixel centres."""
        device = self.c2w.device
        h, w = self.height, self.width
        focal = 0.5 * h / torch.tan(0.5 * self.fovy)  # (B,)
        j = torch.arange(w, device=device, dtype=torch.float32) + 0.5 - 0.5 * w
        i = torch.arange(h, device=device, dtype=torch.float32) + 0.5 - 0.5 * h
        ii, jj = torch.meshgrid(i, j, indexing="ij")
        f = focal[:, None, None]
        dirs = torch.stack([jj.expand(len(self), h, w) / f, -ii.expand(len(self), h, w) / f,
                            -torch.ones(len(self), h, w, device=device)], dim=-1)
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand_as(dirs)
        return origins, dirs

    def clip_matrices(self, near: float = 0.05, far: float = 100.0) -> Tensor:
        """(B, 4, 4) world -> clip space (OpenGL perspective, as nvdiffrast takes it). A point's clip-space x/w
        and y/w are the normalised device coordinates of the pixel its ray passes through, matching `rays()`:
        pixel column i, row j (row 0 at the top) sits at x = (2i + 1) / W - 1, y = 1 - (2j + 1) / H."""
        f = 1.0 / torch.tan(0.5 * self.fovy)
        proj = torch.zeros(len(self), 4, 4, device=self.c2w.device, dtype=self.c2w.dtype)
        proj[:, 0, 0] = f * (self.height / self.width)
        proj[:, 1, 1] = f
        proj[:, 2, 2] = (far + near) / (near - far)
        proj[:, 2, 3] = 2.0 * far * near / (near - far)
        proj[:, 3, 2] = -1.0
        return proj @ torch.linalg.inv(self.c2w)

    def subset(self, index: int) -> "Cameras":
        s = slice(index, index + 1)
        return Cameras(self.c2w[s], self.fovy[s], self.elevation[s], self.azimuth[s], self.distance[s],
                       self.light_position[s], self.width, self.height)


def spherical_position(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """(B,) degrees, degrees, units -> (B, 3) positions in the y-up scene frame."""
    e, a = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack([distance * torch.cos(e) * torch.sin(a), distance * torch.sin(e),
                        distance * torch.cos(e) * torch.cos(a)], dim=-1)


def look_at(position: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices (B, 4, 4) for cameras at `position` looking at `target` (the origin), the
    image's up as close to `up` (B, 3) (the scene's +y) as the view allows."""
    target = torch.zeros_like(position) if target is None else target
    forward = target - position
    forward = forward / forward.norm(dim=-1, keepdim=True)
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], device=position.device).expand_as(forward).clone()
    else:
        up = up / up.norm(dim=-1, keepdim=True)
    # Looking straight along up: any axis across the view will do as "up".
    straight = (forward * up).sum(dim=-1).abs() > 0.9999
    up[straight] = torch.tensor([0.0, 0.0, -1.0], device=position.device)
    right = torch.cross(forward, up, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, device=position.device).repeat(position.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, position
    return c2w


def make_cameras(elevation: Tensor, azimuth: Tensor, distance: Tensor, fovy_deg: Tensor, width: int,
                 height: int, light_position: Tensor | None = None) -> Cameras:
    position = spherical_position(elevation, azimuth, distance)
    light = position.clone() if light_position is None else light_position
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    return Cameras(look_at(position), torch.deg2rad(fovy_deg), elevation, azimuth, distance, light, width, height)


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _light_near(position: Tensor, noise: Tensor) -> Tensor:
    """Unit light directions (B, 3) within 60 degrees of the cameras' (Magic3D's strategy in threestudio): the
    elevation above the plane across the camera's direction uniform in [30, 90] degrees, the angle around it
    uniform, both from the uniform transforms of `noise`'s first two columns (standard normal draws, so the
    strategies share the random stream's layout). The distribution is symmetric about the camera's direction,
    so which axes span the plane across it does not matter."""
    z = position / position.norm(dim=-1, keepdim=True)
    helper = torch.where((z[:, 1].abs() > 0.9)[:, None], torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    x = torch.cross(helper, z, dim=-1)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.cross(z, x, dim=-1)
    u = 0.5 * (1.0 + torch.erf(noise[:, :2] / math.sqrt(2.0)))  # uniform in [0, 1]
    around = (2.0 * u[:, 0] - 1.0) * math.pi
    above = math.pi / 6 + u[:, 1] * math.pi / 3
    return ((torch.cos(above) * torch.cos(around))[:, None] * x + (torch.cos(above) * torch.sin(around))[:, None] * y
            + torch.sin(above)[:, None] * z)


def _uniform_over_the_sphere(elevation: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Elevations uniform in degrees within `bounds` mapped, by their share of the range, to elevations uniform
    over the sphere's area (sin(elevation) uniform), as threestudio's random cameras compute it: sin(elevation)
    uniform in [lo / 90, hi / 90]. For bounds other than +-90 that range is narrower than the bounds (threestudio's
    [-10, 45] gives [-6.4, 30] degrees); it is kept so, being what the published recipes trained with."""
    lo, hi = bounds
    share = (elevation - lo) / (hi - lo) if hi > lo else torch.zeros_like(elevation)
    return torch.rad2deg(torch.asin((lo + (hi - lo) * share) / 90.0))


def sample_cameras(cfg: CameraConfig, n: int, width: int, height: int, generator: torch.Generator,
                   render: RenderConfig) -> Cameras:
    """Training cameras: distance, fovy, elevation, azimuth uniform in the configured ranges (a batch's
    elevations uniform over the sphere's area instead with probability `elevation_sphere_prob`), then
    perturbed as the config says (`position_jitter`, `center_jitter`, `up_jitter`); elevation, azimuth and
    distance stay the drawn values, which choose the view prompts (as threestudio's unperturbed angles do).

    The point light sits near the camera, as `render`'s light settings say. `light_sample` dreamfusion
    (DreamFusion): its direction is the camera's perturbed by Gaussian noise of std `light_jitter` (x the
    camera's distance, or scene units with `light_jitter_absolute`); magic3d (threestudio's Magic3D strategy):
    30 to 90 degrees above the plane across the camera's direction, uniform in angle, at any angle around it.
    Its distance is uniform in `light_distance`, a multiple of the camera distance, or with
    `light_distance_absolute` scene units from the origin (threestudio's light_distance_range). The same
    number of draws whichever the settings, but for the optional ones last.

    With `cfg.views` > 1 the batch is objects of that many views (`sample_multiview_cameras`).
    """
    if cfg.views > 1:
        return sample_multiview_cameras(cfg, n, width, height, generator, render)
    distance = _uniform(n, cfg.distance, generator)
    fovy = _uniform(n, cfg.fovy, generator)
    elevation = _uniform(n, cfg.elevation, generator)
    azimuth = _uniform(n, cfg.azimuth, generator)
    light_noise = torch.randn(n, 3, generator=generator)
    light_scale = _uniform(n, render.light_distance, generator)
    # drawn after the others and only when on, so that runs without it see the random stream they always saw
    if cfg.elevation_sphere_prob > 0 and float(torch.rand(1, generator=generator)) < cfg.elevation_sphere_prob:
        elevation = _uniform_over_the_sphere(elevation, cfg.elevation)
    if cfg.distance_relative:
        distance = distance / torch.tan(0.5 * torch.deg2rad(fovy))
    position = spherical_position(elevation, azimuth, distance)
    light = _light_positions(position, distance, light_noise, light_scale, render)
    cameras = make_cameras(elevation, azimuth, distance, fovy, width, height, light)
    if max(cfg.position_jitter, cfg.center_jitter, cfg.up_jitter) > 0:
        # drawn last and only when on, so that runs without jitter see the random stream they always saw
        moved = position + cfg.position_jitter * (2.0 * torch.rand(n, 3, generator=generator) - 1.0)
        target = cfg.center_jitter * torch.randn(n, 3, generator=generator)
        up = torch.tensor([0.0, 1.0, 0.0]) + cfg.up_jitter * torch.randn(n, 3, generator=generator)
        cameras.c2w = look_at(moved, target, up)
    return cameras


def _light_positions(position: Tensor, distance: Tensor, noise: Tensor, scale: Tensor,
                     render: RenderConfig) -> Tensor:
    """The point lights of cameras at `position` (N, 3), from their draws `noise` (N, 3) and `scale` (N,):
    render.light_sample's direction, at render.light_distance (absolute, or x the camera's distance)."""
    if render.light_sample == "magic3d":
        direction = _light_near(position, noise)
    elif render.light_jitter_absolute:
        direction = position + render.light_jitter * noise
    else:
        direction = position + render.light_jitter * distance[:, None] * noise
    direction = direction / direction.norm(dim=-1, keepdim=True)
    return direction * (scale if render.light_distance_absolute else distance * scale)[:, None]


def sample_multiview_cameras(cfg: CameraConfig, n: int, width: int, height: int, generator: torch.Generator,
                             render: RenderConfig) -> Cameras:
    """MVDream's training batches, as MVDream-threestudio's random multi-view cameras draw them: n / views
    objects, each of `cfg.views` cameras (consecutive in the batch) sharing one elevation, distance and fovy
    and one light draw, at azimuths 360 / views apart from a uniform random start, so that a batch's views
    cover the azimuth range; `distance_relative` and `elevation_sphere_prob` (one draw per batch) as in
    `sample_cameras`. Perturbations, where configured, are drawn once per object."""
    k = cfg.views
    if n % k:
        raise ValueError(f"a batch of {n} cameras is not whole objects of {k} views")
    m = n // k
    distance = _uniform(m, cfg.distance, generator)
    fovy = _uniform(m, cfg.fovy, generator)
    elevation = _uniform(m, cfg.elevation, generator)
    start = torch.rand(m, generator=generator)
    light_noise = torch.randn(m, 3, generator=generator)
    light_scale = _uniform(m, render.light_distance, generator)
    if cfg.elevation_sphere_prob > 0 and float(torch.rand(1, generator=generator)) < cfg.elevation_sphere_prob:
        elevation = _uniform_over_the_sphere(elevation, cfg.elevation)
    if cfg.distance_relative:
        distance = distance / torch.tan(0.5 * torch.deg2rad(fovy))
    lo, hi = cfg.azimuth
    azimuth = ((start[:, None] + torch.arange(k)[None, :]) / k * (hi - lo) + lo).reshape(-1)
    each = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731  (one value per object -> per view)
    elevation, distance, fovy, light_noise = each(elevation), each(distance), each(fovy), each(light_noise)
    light_scale = each(light_scale)
    position = spherical_position(elevation, azimuth, distance)
    light = _light_positions(position, distance, light_noise, light_scale, render)
    cameras = make_cameras(elevation, azimuth, distance, fovy, width, height, light)
    if max(cfg.position_jitter, cfg.center_jitter, cfg.up_jitter) > 0:
        moved = position + each(cfg.position_jitter * (2.0 * torch.rand(m, 3, generator=generator) - 1.0))
        target = each(cfg.center_jitter * torch.randn(m, 3, generator=generator))
        up = torch.tensor([0.0, 1.0, 0.0]) + each(cfg.up_jitter * torch.randn(m, 3, generator=generator))
        cameras.c2w = look_at(moved, target, up)
    return cameras


def orbit_cameras(cfg: CameraConfig, n: int, width: int, height: int, elevation: float | None = None) -> Cameras:
    """`n` evenly spaced azimuths at the evaluation elevation, distance and fovy (turntables, previews)."""
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(full(cfg.eval_elevation if elevation is None else elevation), azimuth,
                        full(cfg.eval_distance), full(cfg.eval_fovy), width, height)


VIEWS = ("front", "side", "back", "overhead")


def view_indices(cameras: Cameras, cfg: CameraConfig) -> Tensor:
    """`view_names` as indices into VIEWS, computed where the cameras live: on a GPU, reading the angles
    back to the host would wait for every kernel queued before. The same rules, in float64 as there."""
    elevation, azimuth = cameras.elevation.double(), cameras.azimuth.double().abs()
    index = torch.full(elevation.shape, VIEWS.index("side"), dtype=torch.long, device=elevation.device)
    index = torch.where(azimuth > 180.0 - cfg.back_threshold, VIEWS.index("back"), index)
    index = torch.where(azimuth < cfg.front_threshold, VIEWS.index("front"), index)
    return torch.where(elevation > cfg.overhead_threshold, VIEWS.index("overhead"), index)


def view_names(cameras: Cameras, cfg: CameraConfig) -> list[str]:
    """DreamFusion's view-dependent prompt suffixes, one per camera."""
    names = []
    for elev, azim in zip(cameras.elevation.tolist(), cameras.azimuth.tolist()):
        if elev > cfg.overhead_threshold:
            names.append("overhead")
        elif abs(azim) < cfg.front_threshold:
            names.append("front")
        elif abs(azim) > 180.0 - cfg.back_threshold:
            names.append("back")
        else:
            names.append("side")
    return names

