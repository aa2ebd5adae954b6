"""Magic3D's fine-stage scene: a DMTet surface rendered through the rasterizer, against the mesh ray caster;
its start from a coarse NeRF, gradients, checkpoints and regularisers; the stage's view of the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from threed import raycast, stages
from threed.cameras import make_cameras
from threed.config import build_config
from threed.errors import UserError
from threed.fields.dmtet import DMTetGeometry
from threed.fields.nerf import NeRFField
from threed.fields.tetgrid import TetGrid
from threed.render.background import Background
from threed.render.rasterize import nvdiffrast_available
from threed.scenes.mesh import EmptySurface, MeshScene

CENTER, RADIUS = (0.3, 0.2, -0.1), 0.35  # off-centre: a flipped or mirrored image would not overlap


def sphere_scene(resolution: int = 48, extra: tuple[str, ...] = (), rasterizer: str = "torch",
                 device: str = "cpu") -> MeshScene:
    cfg = stages.MESH.config(build_config("magic3d-oracle", ["render.background_color=[0, 0, 0]",
                                                             f"mesh.rasterizer={rasterizer}", *extra]))
    c = torch.tensor(CENTER)
    geometry = DMTetGeometry.from_sdf(lambda p: (p - c.to(p)).norm(dim=-1) - RADIUS, TetGrid.cube(resolution, 1.0),
                                      device=device)
    torch.manual_seed(0)
    return MeshScene(cfg, geometry, NeRFField(cfg.field, 1.0, device), Background(cfg.render), device)


def views(n: int = 4, width: int = 96, height: int = 80):
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return make_cameras(torch.tensor([10.0, 40.0, -20.0, 0.0])[:n], torch.tensor([0.0, 70.0, 200.0, -100.0])[:n],
                        full(1.8), full(45.0), width, height)


def reference_coverage(cams) -> torch.Tensor:
    """Fraction of each pixel covered by the analytic sphere (a fine icosphere), 4x4 rays per pixel."""
    ico = trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)
    ico.apply_translation(CENTER)
    v, f = torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces)
    white = torch.ones(len(v), 3)
    black = torch.zeros(len(cams), cams.height, cams.width, 3)
    return raycast.render_mesh(v, f, white, cams, "albedo", 0.1, black, supersample=4)[..., 0]


def test_silhouette_and_depth_match_the_ray_caster():
    """A sphere's DMTet surface (48 cells over [-1, 1]^3), rendered at 96x80 from four off-axis views, covers
    the pixels that threed/raycast.py's ray caster finds on a subdivided icosphere of the same sphere.

    Measured (2-core CPU): IoU of the > 0.5 masks 0.996-1.0 per view, mean |opacity - coverage| 0.0034 (the
    ray caster's 4x4 supersampling against the one-sample antialiased edge); where both are fully covered,
    |depth - the ray caster's hit distance| median 0.001, 95th percentile 0.004 (max 0.08, at grazing
    silhouette pixels; a cell is 0.042). Thresholds: IoU 0.98, opacity MAE 0.01, depth median 0.01 and 95th
    percentile 0.03 (under a cell).
    """
    scene = sphere_scene()
    scene.eval()
    cams = views()
    with torch.no_grad():
        out = scene.render(cams, "albedo")
    assert out.rgb.shape == (4, 80, 96, 3) and out.opacity.shape == (4, 80, 96, 1)
    coverage = reference_coverage(cams)
    ours, ref = out.opacity[..., 0] > 0.5, coverage > 0.5
    iou = [float((ours[i] & ref[i]).sum() / (ours[i] | ref[i]).sum()) for i in range(4)]
    print("IoU", iou, "MAE", float((out.opacity[..., 0] - coverage).abs().mean()))
    assert min(iou) >= 0.98
    assert float((out.opacity[..., 0] - coverage).abs().mean()) <= 0.01
    rays_o, rays_d = cams.rays()
    hits = raycast.raycast(*_icosphere(), rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))
    full = (out.opacity[..., 0] > 0.999).reshape(-1) & hits.hit
    assert int(full.sum()) > 1000
    err = (out.depth.reshape(-1)[full] - hits.t[full]).abs()
    print("depth error median", float(err.median()), "95%", float(err.quantile(0.95)), "max", float(err.max()))
    assert float(err.median()) <= 0.01 and float(err.quantile(0.95)) <= 0.03
    # the background shows where nothing is: black here, as configured
    assert float(out.rgb[~ours & ~ref].abs().max()) <= 1e-6


def _icosphere():
    ico = trimesh.creation.icosphere(subdivisions=5, radius=RADIUS)
    ico.apply_translation(CENTER)
    return torch.tensor(ico.vertices, dtype=torch.float32), torch.tensor(ico.faces)


def test_gradients_reach_the_sdf_offsets_and_texture_and_regularisers_follow_their_weights():
    scene = sphere_scene(24, ("mesh.loss.normal_consistency=1", "mesh.loss.laplacian=0.5"))
    scene.train()
    groups = scene.param_groups()
    assert len(groups) == 3  # sdf, deformation, texture; the background is frozen (mesh.lr_background 0)
    assert not any(p.requires_grad for p in scene.background.parameters())
    out = scene.render(views(2, 48, 40), "lambertian")
    regs = scene.regularisers(out, 0)
    assert set(regs) == {"normal_consistency", "laplacian"}  # sign_flip's weight is 0: not computed
    (((out.rgb - 0.3) ** 2).sum() + sum(regs.values())).backward()
    for params, _ in groups:
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)



def test_background_augmentation_is_the_mesh_stages_own():
    """render.random_aug (ProlificDreamer's NeRF stage) does not leak into the mesh stage: mesh.random_aug."""
    assert sphere_scene(8, ("render.random_aug=0.5",)).background.random_aug == 0.0
    assert sphere_scene(8, ("render.random_aug=0.5", "mesh.random_aug=0.25")).background.random_aug == 0.25



def test_a_fresh_texture_is_of_the_stage_s_kind():
    """mesh.fresh_texture renews the texture as the stage shades: a material field where it is physically based
    (pbr), a NeRF-shaped texture field otherwise."""
    from threed.fields.material import MaterialField

    small = ("field.n_levels=2", "field.log2_hashmap_size=10", "mesh.fresh_texture=true")
    assert isinstance(stages.renew_appearance(sphere_scene(8, (*small, "mesh.shading=pbr"))).texture, MaterialField)
    plain = stages.renew_appearance(sphere_scene(8, small)).texture
    assert isinstance(plain, NeRFField) and not isinstance(plain, MaterialField)


def test_texture_grid_and_mlp_can_take_their_own_rates():
    """mesh.lr_texture_mlp (ProlificDreamer's texture stage: grid 0.01, MLP 0.001) splits the texture group."""
    scene = sphere_scene(8, ("mesh.lr_texture_mlp=0.001",))
    groups = scene.param_groups()
    assert [schedule(0) for _, schedule in groups] == [1e-3, 0.01, 0.01, 0.001]  # sdf, offsets, grid, MLP
    assert groups[2][0] == list(scene.texture.encoding.parameters())
    assert groups[3][0] == list(scene.texture.mlp.parameters())


def test_textureless_and_lambertian_shade_with_the_mesh_normals():
    """Textureless: lighting alone, brightest where the normal faces the light (the camera's position here)."""
    scene = sphere_scene(32)
    scene.eval()
    cams = views(1, 64, 64)
    with torch.no_grad():
        plain = scene.render(cams, "textureless").rgb[0]
    covered = scene.render(cams, "albedo").opacity[0, ..., 0] > 0.999
    grey = plain[covered]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    ambient = scene.cfg.render.ambient
    assert float(grey.min()) >= ambient - 1e-5 and float(grey.max()) > 0.95  # a point faces the light head-on




def test_the_mesh_stage_picks_its_shading_from_its_own_settings():
    """mesh.albedo_prob, not render.albedo_prob (the NeRF stage's), decides the mesh stage's albedo share."""
    scene = sphere_scene(8, ("mesh.shading=random", "mesh.albedo_prob=1.0", "render.albedo_prob=0.0"))
    generator = torch.Generator().manual_seed(0)
    assert {scene.pick_shading(step, generator) for step in range(20)} == {"albedo"}


def test_soft_shading_draws_the_ambient_share_per_training_render():
    """mesh.soft_shading (threestudio's soft_shading, on in the magic3d preset): a training render is shaded with
    ambient = one uniform draw from the run's generator, the rest diffuse; the same render at evaluation, or with
    the option off, uses render.ambient. Albedo and normal-map renders draw nothing."""
    scene = sphere_scene(16, ("mesh.soft_shading=true", "mesh.shading=random", "guidance.type=stable_diffusion"))
    cams = views(1, 32, 32)
    fixed = scene.cfg.render.ambient
    scene.train()
    draws = torch.Generator().manual_seed(5)
    shares = [float(torch.rand((), generator=draws)) for _ in range(3)]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        soft = [scene.render(cams, "textureless", generator=generator).rgb for _ in range(3)]
        state = generator.get_state()
        scene.render(cams, "albedo", generator=generator)
        scene.render(cams, "normal", generator=generator)
        assert torch.equal(generator.get_state(), state)
        scene.eval()
        for rgb, share in zip(soft, shares):
            scene.cfg.render.ambient = share
            assert torch.allclose(rgb, scene.render(cams, "textureless").rgb, atol=1e-6)
        scene.cfg.render.ambient = fixed
        plain = scene.render(cams, "textureless", generator=generator).rgb
        assert not any(torch.allclose(plain, rgb, atol=1e-3) for rgb in soft)
    assert build_config("magic3d").mesh.soft_shading and not build_config("magic3d-cpu").mesh.soft_shading
    with pytest.raises(UserError, match="mesh.soft_shading"):  # the oracle's reference uses render.ambient
        build_config("magic3d-oracle", ["mesh.soft_shading=true", "mesh.shading=random"])


def test_start_from_a_coarse_field_inherits_its_albedo_and_level(tmp_path):
    """`from_coarse`: the surface at the coarse density level, the texture an exact copy of the field."""
    cfg = stages.MESH.config(build_config("magic3d-oracle", ["mesh.resolution=24"]))
    torch.manual_seed(1)
    field = NeRFField(cfg.field, cfg.render.bound)
    bg = Background(cfg.render)
    level = 5.0
    scene = MeshScene.from_coarse(cfg, field, bg, level, "cpu", progress=False)
    points = torch.rand(500, 3) * 1.6 - 0.8
    with torch.no_grad():
        assert torch.equal(scene.texture.albedo(points), field.albedo(points))
        v, _ = scene.geometry.extract()
        density = field.density(v)
    # the surface lies where the density crosses the level (within the grid's linear interpolation)
    assert float(((density - level).abs() / level).median()) < 0.5
    for p in scene.texture.parameters():  # a copy, not the coarse field's own tensors
        assert all(p is not q for q in field.parameters())



@pytest.mark.parametrize("fresh", [(), ("texture",), ("texture", "background")])
def test_a_stage_start_copies_or_renews_the_appearance_and_keeps_the_surface(fresh):
    """mesh_from_mesh: the surface is the stage before's; the texture field and background are copies of its
    (the default) or, with mesh.fresh_texture / fresh_background (threestudio builds both anew at a stage's
    start), newly initialised: none of the trained values survive."""
    keys = ("render.background=mlp", *(f"mesh.fresh_{part}={part in fresh}" for part in ("texture", "background")))
    before = sphere_scene(16, ("render.background=mlp",))
    with torch.no_grad():
        for p in (*before.texture.parameters(), *before.background.parameters()):
            p.add_(0.1)  # trained: unlike any new one
    cfg = stages.MESH.config(build_config("magic3d-oracle", ["render.background_color=[0, 0, 0]",
                                                             "mesh.rasterizer=torch", *keys]))
    after = stages.mesh_from_mesh(cfg, type("Previous", (), {"scene": before})(), {}, "cpu", False)
    assert torch.equal(after.geometry.sdf, before.geometry.sdf)
    for part in ("texture", "background"):
        new, old = getattr(after, part), getattr(before, part)
        assert all(p is not q for p in new.parameters() for q in old.parameters())
        same = [torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters(), strict=True)]
        assert not any(same) if part in fresh else all(same), part


def test_checkpoint_round_trip_rebuilds_the_grid():
    scene = sphere_scene(24)
    with torch.no_grad():
        scene.geometry.sdf.add_(0.01 * torch.randn_like(scene.geometry.sdf))
        scene.geometry.deformation.add_(torch.randn_like(scene.geometry.deformation))
    state = scene.state_dict()
    again = MeshScene.from_state(scene.cfg, state, "cpu")
    assert again.geometry.grid.cells == scene.geometry.grid.cells
    cams = views(1, 40, 32)
    scene.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(scene.render(cams, "lambertian").rgb, again.render(cams, "lambertian").rgb)


def test_an_empty_surface_is_an_error_not_a_blank_render():
    scene = sphere_scene(16)
    with torch.no_grad():
        scene.geometry.sdf.fill_(0.1)  # everything outside
    with pytest.raises(EmptySurface, match="vanished"):
        scene.render(views(1, 16, 16), "albedo")


def test_the_mesh_stage_sees_its_own_cameras_render_size_and_t_range():
    cfg = build_config("magic3d", ["mesh.width=256", "mesh.t_max=0.4"])
    fine = stages.MESH.config(cfg)
    assert (fine.render.width, fine.render.height, fine.steps) == (256, 512, 5000)
    assert fine.camera.fovy == (30.0, 45.0) and cfg.camera.fovy == (40.0, 70.0)
    assert fine.guidance.t_max(0) == 0.4 and cfg.guidance.t_max(0) == 0.98
    assert fine.guidance.sd == cfg.guidance.sd and fine.render.background == cfg.render.background
    assert stages.NERF.config(cfg) is cfg


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and nvdiffrast_available("cuda")),
                    reason="needs CUDA and nvdiffrast")
def test_nvdiffrast_and_torch_backends_render_alike():
    torch_scene, nv_scene = sphere_scene(48, device="cuda"), sphere_scene(48, rasterizer="nvdiffrast", device="cuda")
    nv_scene.texture.load_state_dict(torch_scene.texture.state_dict())
    cams = views().to("cuda")
    with torch.no_grad():
        a, b = torch_scene.render(cams, "lambertian"), nv_scene.render(cams, "lambertian")
    assert float((a.opacity - b.opacity).abs().mean()) < 0.005
    assert float((a.rgb - b.rgb).abs().mean()) < 0.01
    np.testing.assert_allclose(a.depth.cpu().numpy(), b.depth.cpu().numpy(), atol=1e-3)


def test_normal_maps_match_the_analytic_sphere_and_the_oracles_reference():
    """`shading: normal` (the geometry stage's image for the prior) renders (n + 1) / 2 of the world-space
    outward normal over black, as the oracle prior renders its reference; on a sphere n is known in closed
    form: (point - centre) / radius at the depth-ray hit.

    Measured (2-core CPU, the 48-cell DMTet sphere at 96x80): on fully covered pixels the mean |rgb - the
    analytic map| is 0.0052 (max 0.029, DMTet's facets), against the ray caster's render of a fine icosphere
    0.0053. Thresholds 0.03 mean (6x), and the background exactly 0.
    """
    scene = sphere_scene()
    scene.eval()
    cams = views()
    with torch.no_grad():
        out = scene.render(cams, "normal")
    full = out.opacity[..., 0] > 0.999
    rays_o, rays_d = cams.rays()
    points = rays_o + rays_d * out.depth
    analytic = (torch.nn.functional.normalize(points - torch.tensor(CENTER), dim=-1) + 1) / 2
    err = (out.rgb - analytic).abs()[full]
    v, f = _icosphere()
    oracle = raycast.render_mesh(v, f, torch.ones(len(v), 3), cams, "normal", 0.1,
                                 torch.zeros(len(cams), cams.height, cams.width, 3), supersample=1)
    against_oracle = (out.rgb - oracle).abs()[full]
    print("normal map error", float(err.mean()), float(err.max()), "vs oracle", float(against_oracle.mean()))
    assert int(full.sum()) > 1000 and float(err.mean()) <= 0.03 and float(against_oracle.mean()) <= 0.03
    assert torch.equal(out.background, torch.zeros_like(out.background))
    assert float(out.rgb[out.opacity[..., 0] == 0].abs().max()) == 0.0


def test_the_exported_surface_is_clean_where_marching_tetrahedra_leaves_zero_area_faces(tmp_path):
    """An SDF rounded to half cells has many grid vertices exactly on the surface, where marching tetrahedra
    puts several mesh vertices on one point: measured 389 coincident vertices and 778 zero-area faces (of
    1764) in the raw surface at 24 cells. `export_mesh` repairs it (threed.mesh.repair: 986 faces left): its
    OBJ and PLY load as one closed manifold with none, enclosing the raw surface's volume (equal to 1e-15 as
    measured; bound 0.1%, the files' float32 rounding)."""
    from exporters import export_mesh
    from threed.mesh import mesh_defects

    scene = sphere_scene(24)
    h = scene.geometry.grid.cell_size
    with torch.no_grad():
        scene.geometry.sdf.copy_(torch.round(scene.geometry.sdf / h * 2) / 2 * h)
        scene.geometry.deformation.zero_()
        raw_v, raw_f = (t.numpy() for t in scene.geometry.extract())
    raw = mesh_defects(raw_v, raw_f)
    assert raw["zero_area_faces"] > 300 and raw["duplicate_vertices"] > 150
    mesh = scene.export_mesh().mesh
    written = export_mesh(tmp_path, ["obj", "ply"], mesh.vertices, mesh.faces, mesh.colors, mesh.normals)
    for path in (p for p in written if p.suffix in (".obj", ".ply")):
        loaded = trimesh.load(path, force="mesh")
        assert loaded.is_watertight and loaded.is_winding_consistent, path.name
        defects = mesh_defects(loaded.vertices, loaded.faces)
        assert defects.pop("components") == 1 and not any(defects.values()), (path.name, defects)
        assert loaded.volume == pytest.approx(trimesh.Trimesh(raw_v, raw_f, process=False).volume, rel=1e-3)


def test_keep_components_takes_small_parts_out_of_the_render():
    """mesh.keep_components (threestudio's isosurface_remove_outliers, 0.01 in ProlificDreamer's texture
    stage): a floater under that fraction of the largest part's faces is not rendered; the SDF keeps it."""
    big, small = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.6, 0.0])

    def sdf(p):
        return torch.minimum((p - big.to(p)).norm(dim=-1) - 0.35, (p - small.to(p)).norm(dim=-1) - 0.08)

    cams = views(1, 48, 48)
    renders = {}
    for keep in (0.0, 0.1):  # the floater: 184 faces, 5% of the sphere's 3456
        cfg = stages.MESH.config(build_config("magic3d-oracle", ["render.background_color=[0, 0, 0]",
                                                                 "mesh.rasterizer=torch", f"mesh.keep_components={keep}"]))
        geometry = DMTetGeometry.from_sdf(sdf, TetGrid.cube(32, 1.0))
        scene = MeshScene(cfg, geometry, NeRFField(cfg.field, 1.0), Background(cfg.render), "cpu")
        with torch.no_grad():
            renders[keep] = (scene.render(cams, "albedo").opacity, scene._mesh[1].shape[0])
        all_faces = geometry.extract()[1].shape[0]
    (everything, n_all), (kept, n_kept) = renders[0.0], renders[0.1]
    assert n_all == all_faces and 0.8 * n_all < n_kept < n_all  # the floater's faces, a few % of the total
    assert float(everything.sum() - kept.sum()) > 10  # its pixels: the view sees it (a disc of ~40 px)
    assert float((kept - everything).clamp_min(0).sum()) < 1e-6  # nothing else changed
