"""The volume renderer against closed forms: a homogeneous medium gives 1 - exp(-sigma L) exactly, and a
homogeneous ball gives the chord-length law up to quadrature error."""

import math

import pytest
import torch
from torch import nn

from threed.cameras import make_cameras
from threed.config import RenderConfig, build_config
from threed.errors import UserError
from threed.render.background import Background
from threed.render.volume import VolumeRenderer, ray_aabb


class ConstantField(nn.Module):
    """sigma inside a ball of `radius` (or everywhere in the cube when radius is None), constant albedo."""

    def __init__(self, sigma: float, albedo=(0.2, 0.4, 0.6), radius: float | None = None):
        super().__init__()
        self.sigma, self.radius = sigma, radius
        self.register_buffer("color", torch.tensor(albedo))

    def density(self, x):
        inside = torch.ones(len(x)) if self.radius is None else (x.norm(dim=-1) < self.radius).float()
        return self.sigma * inside

    def forward(self, x):
        return self.density(x), self.color.expand(len(x), 3)

    def normal(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def front_camera(size=9, distance=3.0, fovy=30.0):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(0.0), one(0.0), one(distance), one(fovy), size, size)


def test_ray_aabb_entry_exit():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far = ray_aabb(o, d, 1.0)
    assert near[0].item() == pytest.approx(2.0) and far[0].item() == pytest.approx(4.0)
    assert near[1] == far[1]  # a miss has an empty interval


def test_homogeneous_cube_is_exact():
    sigma = 0.7
    cfg = RenderConfig(num_samples=16, background="solid", background_color=(1.0, 1.0, 1.0), backend="torch")
    renderer = VolumeRenderer(cfg, "cpu")
    field = ConstantField(sigma).eval()
    cam = front_camera()
    out = renderer(field, Background(cfg).eval(), cam, "albedo")
    # The central pixel's ray crosses the cube along z: length 2.
    centre = out.opacity[0, 4, 4, 0]
    assert math.isclose(centre.item(), 1 - math.exp(-2 * sigma), rel_tol=1e-5)
    rgb = out.rgb[0, 4, 4]
    expected = torch.tensor([0.2, 0.4, 0.6]) * centre + (1 - centre)
    assert torch.allclose(rgb, expected, atol=1e-5)
    # Every pixel: opacity follows that pixel's own chord through the cube.
    o, d = cam.rays()
    near, far = ray_aabb(o.view(-1, 3), d.view(-1, 3), 1.0)
    assert torch.allclose(out.opacity.view(-1), 1 - torch.exp(-sigma * (far - near)), atol=1e-5)


@pytest.mark.parametrize("num_samples, tol", [(64, 0.05), (512, 0.01)])
def test_homogeneous_ball_follows_chord_lengths(num_samples, tol):
    """Midpoint quadrature of a ball's hard edge: 64 samples over the cube's ~2.3-unit chord are 0.036 apart,
    so per-pixel opacity errors reach a few percent at the edge; 512 samples shrink them below 1%."""
    sigma, radius = 2.0, 0.6
    cfg = RenderConfig(num_samples=num_samples, background="solid", backend="torch")
    out = VolumeRenderer(cfg, "cpu")(ConstantField(sigma, radius=radius).eval(), Background(cfg).eval(),
                                     front_camera(size=15), "albedo")
    o, d = front_camera(size=15).rays()
    o, d = o.view(-1, 3), d.view(-1, 3)
    tc = -(o * d).sum(-1)
    dist2 = (o + tc[:, None] * d).square().sum(-1)
    chord = 2 * torch.sqrt((radius**2 - dist2).clamp_min(0))
    expected = 1 - torch.exp(-sigma * chord)
    assert (out.opacity.view(-1) - expected).abs().max() < tol


def test_lambertian_shading_and_orientation_penalty():
    cfg = RenderConfig(num_samples=64, background="solid", backend="torch", ambient=0.0)
    field = ConstantField(50.0, albedo=(1.0, 1.0, 1.0), radius=0.5).eval()
    cam = front_camera()
    cam.light_position = cam.position.clone()  # light at the camera: the ball's centre faces it
    out = VolumeRenderer(cfg, "cpu")(field, Background(cfg).eval(), cam, "lambertian", need_normals=True)
    # Normals at the visible front of the ball point at the camera and the light: brightness ~ opacity.
    assert out.rgb[0, 4, 4, 0] > 0.95
    # The orientation penalty sees only normals facing away from the camera: ~none here, all when flipped.
    field.normal = lambda x: -x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    flipped = VolumeRenderer(cfg, "cpu")(field, Background(cfg).eval(), cam, "lambertian", need_normals=True)
    assert out.orient.item() < 1e-3 * flipped.orient.item()
    assert flipped.rgb[0, 4, 4, 0] < 0.05



class InwardNormalsBall(nn.Module):
    """A ball of density softplus(c) whose normals point inward, tilted by a learnable vector: the normals do
    not depend on c, so the orientation penalty can reach c only through the compositing weights."""

    def __init__(self, radius: float = 0.5):
        super().__init__()
        self.radius = radius
        self.c = nn.Parameter(torch.tensor(1.0))
        self.tilt = nn.Parameter(torch.tensor([0.1, -0.2, 0.05]))

    def density(self, x):
        return nn.functional.softplus(self.c) * (x.norm(dim=-1) < self.radius).float()

    def forward(self, x):
        return self.density(x), torch.full((len(x), 3), 0.5)

    def normal(self, x):
        return nn.functional.normalize(self.tilt - x, dim=-1)


@pytest.mark.parametrize("path", ["batched", "packed"])
def test_orientation_penalty_turns_normals_and_leaves_density_alone(path):
    """The penalty's value depends on c (through the weights) but its gradient reaches only the normals: the
    compositing weights are detached, as in DreamFusion and threestudio. Without the detach, d/dc would be
    the (non-zero) change measured here."""
    from analytic_fields import MarchingSampler

    cfg = RenderConfig(num_samples=64, occupancy_resolution=0, background="solid", backend="torch", chunk_rays=40)
    renderer = VolumeRenderer(cfg, "cpu") if path == "batched" else packed_renderer(cfg, MarchingSampler())
    field = InwardNormalsBall().eval()
    cam = front_camera(size=11)
    out = renderer(field, Background(cfg).eval(), cam, "albedo", need_normals=True)
    assert out.orient.item() > 0.01  # inward normals on the visible side face away from the camera
    out.orient.backward()
    assert field.c.grad is None or field.c.grad.item() == 0.0
    assert field.tilt.grad is not None and field.tilt.grad.abs().max().item() > 1e-3
    with torch.no_grad():
        field.c += 0.5
        moved = renderer(field, Background(cfg).eval(), cam, "albedo", need_normals=True).orient
    assert abs(moved.item() - out.orient.item()) > 1e-3 * out.orient.item()



def test_orientation_penalty_is_per_ray_that_sees_something():
    """threestudio's normalisation, by hand: with one normal n everywhere, a ray's penalty is its opacity times
    max(0, n . d)^2, and the sum over rays is divided by the number of rays with opacity > 0 (rays that miss
    the ball have exactly 0 and do not count). Every sample in the ball weighs far above the 1e-4 below
    which normals are skipped, so the sum is exact."""
    cfg = RenderConfig(num_samples=64, occupancy_resolution=0, background="solid", backend="torch", chunk_rays=50)
    field = ConstantField(2.0, radius=0.5).eval()
    n = torch.tensor([0.0, 0.0, -1.0])
    field.normal = lambda x: n.expand_as(x)
    cam = front_camera(size=15)
    out = VolumeRenderer(cfg, "cpu")(field, Background(cfg).eval(), cam, "albedo", need_normals=True)
    opacity = out.opacity.view(-1)
    seeing = opacity > 0
    assert 0 < seeing.sum() < opacity.numel()  # some rays miss the ball
    d = cam.rays()[1].reshape(-1, 3)
    by_hand = (opacity * (d @ n).clamp_min(0) ** 2).sum() / seeing.sum()
    assert out.orient.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_occupancy_grid_skips_only_empty_space():
    """Skipping cells whose density*step is below the threshold changes no pixel of a ball by more than the
    mass those cells can hold (here: none, the ball's density is far above the threshold)."""
    cfg_full = RenderConfig(num_samples=64, background="solid", backend="torch", occupancy_resolution=0)
    cfg_skip = RenderConfig(num_samples=64, background="solid", backend="torch", occupancy_resolution=16)
    field = ConstantField(5.0, radius=0.5).eval()
    cam = front_camera(size=15)
    full = VolumeRenderer(cfg_full, "cpu")(field, Background(cfg_full).eval(), cam, "albedo")
    skipping = VolumeRenderer(cfg_skip, "cpu")
    skipping.update_occupancy(field, 0)
    occupied = skipping.occupancy.binary.float().mean().item()
    assert 0.05 < occupied < 0.4  # the ball (and one cell around it), not the whole cube
    out = skipping(field, Background(cfg_skip).eval(), cam, "albedo")
    assert torch.allclose(out.opacity, full.opacity, atol=1e-6)


class TwoDensities(ConstantField):
    """A faint ball (sigma 0.05: alpha about 0.001 per sample) around a dense core (sigma 20)."""

    def density(self, x):
        r = x.norm(dim=-1)
        return torch.where(r < 0.25, 20.0, torch.where(r < 0.6, 0.05, 0.0))


def test_alpha_threshold_drops_the_faint_samples_before_the_field_runs_with_gradients():
    """render.alpha_threshold (threestudio's prune_alpha_threshold 0.01): in occupied cells, the samples whose
    alpha is below 0.01 are not evaluated or composited; the dense core renders as before, the faint shell's
    pixels lose the opacity only it held. The threshold is nerfacc's: the grid's mean value where that is lower."""
    cam = front_camera(size=15)
    renders = {}
    for threshold in (0.0, 0.01):
        cfg = RenderConfig(num_samples=64, background="solid", backend="torch", occupancy_resolution=16,
                           occupancy_threshold=1e-4, alpha_threshold=threshold)
        renderer = VolumeRenderer(cfg, "cpu")
        field = TwoDensities(0.0).eval()
        renderer.update_occupancy(field, 0)
        seen = count_field_points(field)
        renders[threshold] = (renderer(field, Background(cfg).eval(), cam, "albedo").opacity[0, ..., 0], sum(seen))
        if threshold:  # a grid whose mean value is below the shell's alpha: that mean is the threshold
            renderer.occupancy.occs.fill_(1e-5)
            seen.clear()
            renderer(field, Background(cfg).eval(), cam, "albedo")
            assert sum(seen) > renders[threshold][1]
    (full, n_full), (pruned, n_pruned) = renders[0.0], renders[0.01]
    assert n_pruned < 0.5 * n_full  # the faint shell's samples are not evaluated with gradients
    centre = full.shape[0] // 2
    assert float(pruned[centre, centre]) == pytest.approx(float(full[centre, centre]), abs=0.03)  # the core
    shell_only = (full > 0.01) & (full < 0.2)
    assert shell_only.any() and float(pruned[shell_only].max()) == 0.0


# -- empty space: chunks of rays that meet no occupied cell, or miss the scene ---------------------------
def small_field():
    from threed.config import FieldConfig
    from threed.fields.nerf import NeRFField

    torch.manual_seed(0)
    cfg = FieldConfig(backend="torch", n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32,
                      hidden_dim=16)
    return NeRFField(cfg, 1.0)


def count_field_points(field):
    """Record how many points each call of `field(x)` receives."""
    seen = []
    forward = field.forward

    def counting(x):
        seen.append(len(x))
        return forward(x)

    field.forward = counting
    return seen


def looking_away(cam):
    """The same camera turned by 180 degrees about its up axis: every ray leaves the scene cube unmet."""
    cam.c2w[:, :3, 0] *= -1
    cam.c2w[:, :3, 2] *= -1
    return cam


@pytest.mark.parametrize("case", ["empty_occupancy_grid", "camera_looking_away"])
def test_render_of_only_empty_space_is_the_background(case):
    """A training render (stratified samples, Lambertian shading, normals for the orientation loss, several
    chunks) that sees nothing: opacity exactly 0, every pixel the background, and a backward pass."""
    colour = (0.3, 0.5, 0.7)
    cfg = RenderConfig(num_samples=32, occupancy_resolution=16, background="solid", background_color=colour,
                       backend="torch", chunk_rays=50)
    renderer = VolumeRenderer(cfg, "cpu")
    field = small_field().train()
    generator = torch.Generator().manual_seed(0)
    renderer.update_occupancy(field, 0, generator)
    cam = front_camera(size=15)
    if case == "empty_occupancy_grid":
        renderer.occupancy.binary.zero_()
    else:
        cam = looking_away(cam)
    seen = count_field_points(field)
    out = renderer(field, Background(cfg).train(), cam, "lambertian", need_normals=True, generator=generator)
    assert len(seen) >= 5  # 225 rays in chunks of 50
    if case == "empty_occupancy_grid":
        assert set(seen) == {0}  # the field was evaluated on zero points in every chunk
    assert out.opacity.abs().max().item() == 0.0
    assert torch.allclose(out.rgb, torch.tensor(colour).expand_as(out.rgb))
    assert out.orient.item() == 0.0 and out.depth.abs().max().item() == 0.0
    (out.rgb.mean() + out.orient + out.opacity.mean()).backward()
    grad = field.encoding.params.grad
    assert grad is None or grad.abs().max().item() == 0.0


def test_render_of_zero_rays():
    cfg = RenderConfig(num_samples=16, occupancy_resolution=8, background="solid", backend="torch")
    renderer = VolumeRenderer(cfg, "cpu")
    field = small_field().train()
    renderer.update_occupancy(field, 0)
    cam = front_camera(size=0)
    out = renderer(field, Background(cfg).train(), cam, "lambertian", need_normals=True,
                   generator=torch.Generator().manual_seed(0))
    assert out.rgb.shape == (1, 0, 0, 3) and out.opacity.shape == (1, 0, 0, 1)
    assert out.orient.item() == 0.0


# -- the packed-sample (nerfacc) path, with a pure-PyTorch marcher in place of nerfacc's sampler -------------
def packed_renderer(cfg: RenderConfig, sampler) -> VolumeRenderer:
    """The renderer's nerfacc code path with `sampler` standing in for nerfacc's occupancy-grid estimator."""
    renderer = VolumeRenderer(RenderConfig(**{**cfg.__dict__, "occupancy_resolution": 0}), "cpu")
    renderer.backend, renderer.estimator = "nerfacc", sampler
    return renderer


@pytest.mark.parametrize("shading", ["albedo", "textureless"])
def test_packed_and_batched_paths_agree(shading):
    """Stratum midpoints (PyTorch path) and fixed steps of diagonal / 128 (packed path) on a smooth blob.

    Measured (CPU): max |rgb difference| 7e-5 albedo, 4e-4 textureless (normals are masked where a sample's
    weight is below 1e-4, which differs slightly between the two sample sets), opacity 5e-6; against 4096
    samples per ray the 128-sample PyTorch render is off by 1.4e-4 (albedo). Allowed: 5e-4 albedo, 2e-3
    textureless, 1e-4 opacity (about 5x, and far below a wrong weight or accumulation, which moves pixels by
    more than 1e-2)."""
    from analytic_fields import GaussianBlob, MarchingSampler

    cfg = RenderConfig(num_samples=128, occupancy_resolution=0, background="solid", backend="torch")
    cam = make_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.0]), torch.tensor([50.0]), 24, 24)
    field = GaussianBlob().eval()
    batched = VolumeRenderer(cfg, "cpu")(field, Background(cfg).eval(), cam, shading)
    packed = packed_renderer(cfg, MarchingSampler())(field, Background(cfg).eval(), cam, shading)
    assert batched.opacity.max() > 0.99 and batched.opacity.min() < 0.01  # the blob and empty space in view
    tol = 5e-4 if shading == "albedo" else 2e-3
    assert (packed.rgb - batched.rgb).abs().max() < tol
    assert (packed.opacity - batched.opacity).abs().max() < 1e-4


def test_packed_path_with_no_samples_renders_the_background():
    """nerfacc's sampler returns no samples for a chunk of rays through empty cells: that chunk is background."""
    from analytic_fields import MarchingSampler

    colour = (0.3, 0.5, 0.7)
    cfg = RenderConfig(num_samples=32, background="solid", background_color=colour, backend="torch", chunk_rays=50)
    field = small_field().train()
    seen = count_field_points(field)
    out = packed_renderer(cfg, MarchingSampler(empty=True))(field, Background(cfg).train(), front_camera(size=15),
                                                            "lambertian", need_normals=True,
                                                            generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 5 and set(seen) == {0}
    assert out.opacity.abs().max().item() == 0.0 and out.orient.item() == 0.0
    assert torch.allclose(out.rgb, torch.tensor(colour).expand_as(out.rgb))
    (out.rgb.mean() + out.orient).backward()


def test_normal_maps_of_the_volume_renderer_are_those_of_its_field_over_black():
    """`shading: normal` in the volume renderer: composited (n + 1) / 2 of the field's normals over a black
    background, whatever the background module draws: the same image a mesh scene gives its prior."""
    import torch

    from threed.cameras import make_cameras
    from threed.config import FieldConfig, RenderConfig
    from threed.fields.nerf import NeRFField
    from threed.render.background import Background
    from threed.render.volume import VolumeRenderer

    cfg = RenderConfig(backend="torch", num_samples=32, occupancy_resolution=0, background="solid",
                       background_color=(1.0, 1.0, 1.0))
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(backend="torch", n_levels=2, max_resolution=32, log2_hashmap_size=10,
                                  hidden_dim=16), 1.0, "cpu")
    cams = make_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.0]), torch.tensor([50.0]), 12, 12)
    with torch.no_grad():
        out = VolumeRenderer(cfg, "cpu")(field, Background(cfg), cams, "normal")
    assert torch.equal(out.background, torch.zeros_like(out.background))
    assert float(out.rgb.min()) >= 0.0 and float(out.rgb.max()) <= 1.0
    covered = out.opacity[..., 0] > 0.5
    assert int(covered.sum()) > 0 and float(out.rgb[covered].std()) > 0.01  # normals vary over the blob
    # where nothing is, black: the colour is the composited normals alone, at most the opacity per channel
    assert bool((out.rgb <= out.opacity + 1e-6).all())


def test_soft_shading_draws_one_ambient_share_per_lit_training_render():
    """render.soft_shading (threestudio's soft_shading, on in magic3d's NeRF stage): a lit training render is
    shaded with ambient = one uniform draw from the run's generator, taken before the ray samples' own draws;
    albedo renders and evaluation renders draw nothing and use render.ambient."""
    field = ConstantField(5.0, radius=0.6).train()
    cam = front_camera()

    def render(shading, generator, **cfg):
        cfg = RenderConfig(num_samples=16, background="solid", backend="torch", **cfg)
        return VolumeRenderer(cfg, "cpu")(field, Background(cfg).eval(), cam, shading, generator=generator).rgb

    generator = torch.Generator().manual_seed(5)
    soft = render("textureless", generator, soft_shading=True)
    expected_generator = torch.Generator().manual_seed(5)
    share = float(torch.rand((), generator=expected_generator))
    assert torch.equal(soft, render("textureless", expected_generator, ambient=share))
    assert not torch.allclose(soft, render("textureless", torch.Generator().manual_seed(5)), atol=1e-3)
    assert torch.equal(render("albedo", torch.Generator().manual_seed(7), soft_shading=True),
                       render("albedo", torch.Generator().manual_seed(7)))
    field.eval()
    assert torch.equal(render("textureless", None, soft_shading=True), render("textureless", None))


def test_soft_shading_is_magic3d_s_and_refused_with_the_oracle():
    assert build_config("magic3d").render.soft_shading and not build_config("dreamfusion-sd").render.soft_shading
    with pytest.raises(UserError, match="render.soft_shading"):  # the oracle's reference uses render.ambient
        build_config("oracle", ["render.soft_shading=true", "render.shading=random"])
