"""DreamGaussian's texture refinement (threed/guidance/sdedit.py): the DDIM schedule and update are diffusers'
DDIMScheduler's; an exact denoiser returns its image; the tiny Stable Diffusion's edit runs and the texture
loss falls; under the oracle the texture stage's colours approach the reference's."""

from __future__ import annotations

import pytest
import torch

from threed.guidance.sdedit import SDEditGuidance, ddim_timesteps, sdedit
from threed.guidance.sds import sd_alphas_cumprod
from threed.schedule import Schedule


def test_the_schedule_and_update_are_diffusers_ddim() -> None:
    """Timesteps and every DDIM step (eta 0) against diffusers' DDIMScheduler configured as Stable Diffusion's
    (scaled-linear betas, steps_offset 1, set_alpha_to_one false), for an arbitrary eps function."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    assert ddim_timesteps(50) == scheduler.timesteps.tolist()
    alphas = sd_alphas_cumprod()
    assert torch.allclose(alphas, scheduler.alphas_cumprod, atol=1e-6)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_fn = lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # noqa: E731
    ours = sdedit(x0, eps_fn, alphas, 50, 0.8, torch.Generator().manual_seed(2))
    # the same by diffusers: noised to timesteps[40] with the same noise, then its steps
    start = int(50 * 0.8)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x = scheduler.add_noise(x0, noise, scheduler.timesteps[start:start + 1])
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(eps_fn(x, t.view(1).expand(2)), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)
    assert ddim_timesteps(50)[start] == 181 and ddim_timesteps(50)[int(50 * 0.95)] == 41  # the module docstring's


def test_an_exact_denoiser_returns_its_image() -> None:
    """The eps of a denoiser that knows the answer I brings any noised render to I, up to the last step's
    sqrt(1 - abar_0) = 0.029 share of its eps (the noise and the render's distance, scaled), from every
    strength: measured mean |out - I| 0.024, 0.027, 0.044, 0.099 at strengths 0, 0.5, 0.8, 0.95 (the later
    the start, the larger the render's share of that eps) against 0.665 for the render. Asserted: under a
    quarter of the render's. A strength past the schedule changes nothing."""
    alphas = sd_alphas_cumprod()
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    render = torch.rand(1, 3, 16, 16) * 2 - 1

    def eps_fn(x, t):
        a = alphas[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    for strength in (0.0, 0.5, 0.8, 0.95):
        out = sdedit(render, eps_fn, alphas, 50, strength, torch.Generator().manual_seed(0))
        assert (out - target).abs().mean() < 0.25 * (render - target).abs().mean(), strength
    assert torch.equal(sdedit(render, eps_fn, alphas, 50, 1.0), render)


def test_tiny_stable_diffusion_edit_runs_and_the_texture_loss_falls(tiny_sd_dir) -> None:
    """The tiny random SD's edit (encode, noise, DDIM steps with CFG 100, decode) as an image's target: 6 Adam
    steps (lr 0.05) on a 32² image under SDEditGuidance with a 10-step DDIM schedule (2 steps at strength 0.8,
    1 at 0.95; the prior's stream reset each step, so the noise is fixed). Measured: the loss 0.1211, 0.0948,
    0.0730, 0.0556, 0.0529, 0.0423 (6 s of CPU on the loaded machine). Asserted: finite, and the last under
    half the first."""
    from threed.cameras import orbit_cameras
    from threed.config import build_config
    from threed.guidance.stable_diffusion import StableDiffusionGuidance

    cfg = build_config("dreamgaussian", [f"guidance.sd.model={tiny_sd_dir}", "guidance.sd.resolution=32",
                                         "device=cpu", "prompt=a duck"])
    prior = StableDiffusionGuidance(cfg, "cpu")
    guidance = SDEditGuidance(prior, Schedule(0, 0.8, 0.95, 5), 10)
    cams = orbit_cameras(cfg.camera, 1, 32, 32)
    image = torch.nn.Parameter(torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.Adam([image], lr=0.05)
    losses = []
    for step in range(6):
        prior.generator.manual_seed(0)
        out = guidance(image, cams, step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_oracle_refinement_brings_a_sphere_texture_to_the_reference(tmp_path) -> None:
    """DreamGaussian's texture stage with the oracle prior (dreamgaussian-oracle's texture section at 64², 50
    steps, DreamGaussian's count; strength 0.803 -> 0.95) on a fixed sphere (radius 0.5, a 32-cell grid) whose
    texture field starts untrained; the reference is the same sphere coloured by position. Mean |colour error|
    of the surface over 4 views at 15 degrees, measured (seed 0, one thread): 0.0918 before, 0.0251 after
    (the SDS objective over the same steps: 0.0261; 100 steps of SDEdit: 0.0159), 4 s of CPU. Asserted: at most
    0.04 and under half the start."""
    import shapes
    from threed import methods
    from threed.cameras import orbit_cameras
    from threed.config import build_config
    from threed.fields.dmtet import DMTetGeometry
    from threed.fields.sdf_init import initial_sdf
    from threed.fields.tetgrid import TetGrid
    from threed.mesh_config import SDFInitConfig
    from threed.render.background import Background
    from threed.scenes.mesh import MeshScene, texture_field
    from threed.stages import GAUSSIAN_TEXTURE, mesh_stage_config
    from threed.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = shapes.save(shapes.sphere(), tmp_path / "sphere.ply")
        cfg = build_config("dreamgaussian-oracle", [f"guidance.oracle.reference={reference}", "device=cpu",
                                                    "texture.steps=50", "texture.width=64", "texture.height=64",
                                                    "texture.resolution=32", "gaussians.refine_strength=[0, 0.803, 0.95, 49]"])
        stage_cfg = mesh_stage_config(cfg, "texture")
        grid = TetGrid.cube(32, 1.0)
        geometry = DMTetGeometry(grid, deform=False, device="cpu")
        geometry.set_sdf(initial_sdf(SDFInitConfig(radius=0.5), grid, 1.0, "cpu"))
        torch.manual_seed(0)
        scene = MeshScene(stage_cfg, geometry, texture_field(stage_cfg, "cpu"), Background(stage_cfg.render), "cpu")
        guidance = methods.get("dreamgaussian").build_guidance(stage_cfg, "cpu", GAUSSIAN_TEXTURE)
        assert isinstance(guidance, SDEditGuidance)  # the preset's objective
        cams = orbit_cameras(stage_cfg.camera, 4, 64, 64, elevation=15.0)

        def colour_error() -> float:
            scene.eval()
            with torch.no_grad():
                out = scene.render(cams, "albedo")
                ref = guidance.prior.render_reference(cams, "albedo", torch.zeros(4, 64, 64, 3))
                inside = out.opacity[..., 0] > 0.99
                return float((out.rgb - ref).abs().mean(-1)[inside].mean())

        before = colour_error()
        Trainer(stage_cfg, "cpu", guidance, run_dir=tmp_path / "run", scene=scene, stage="texture").fit(50, progress=False)
        after = colour_error()
    finally:
        torch.set_num_threads(threads)
    assert after <= 0.04 and after < 0.5 * before, (before, after)
