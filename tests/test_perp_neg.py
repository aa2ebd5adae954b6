"""Perp-Neg (threed/guidance/perp_neg.py): the perpendicular component, the view weights, the guided noise
against hand computations, and the Stable Diffusion guidance with it off (unchanged) and on (on the tiny SD)."""

from __future__ import annotations

import math

import pytest
import torch

from threed.cameras import VIEWS, make_cameras, view_names
from threed.config import CameraConfig, Config, GuidanceConfig, SDConfig, build_config, flatten, to_dict
from threed.errors import UserError
from threed.guidance import perp_neg
from threed.guidance.stable_diffusion import StableDiffusionGuidance

PROMPT = "a yellow rubber duck"
F, S, B, O, U = 0, 1, 2, 3, 4  # rows of the embedding table: front, side, back, overhead, negative prompt


def test_table_rows_follow_the_view_names():
    assert (perp_neg.FRONT, perp_neg.SIDE, perp_neg.BACK, perp_neg.OVERHEAD, perp_neg.UNCOND) == (F, S, B, O, U)
    assert VIEWS == ("front", "side", "back", "overhead")


def test_perpendicular_component_by_hand():
    """x = (3, 4) against y = (1, 0): (0, 4); against y = (1, 1): x - 3.5 (1, 1) = (-0.5, 0.5); a zero y
    leaves x; each image of a batch against its own y; the result is perpendicular to y."""
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    out = perp_neg.perpendicular_component(x, y)
    assert torch.allclose(out, torch.tensor([[0.0, 4.0], [-0.5, 0.5], [3.0, 4.0]]))
    x4, y4 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    p = perp_neg.perpendicular_component(x4, y4)
    assert torch.allclose((p * y4).sum((1, 2, 3)), torch.zeros(2), atol=1e-5)


def test_view_weights_at_chosen_azimuths_by_hand():
    """threestudio's constants; f(a, b, c; r) = a exp(-b r) + c with exp(-0.5) = 0.60653, exp(-0.25) = 0.77880:
    - azimuth 0: r = 1, all front; negatives front, side at -(4 * 0.60653 - 2.426) = -0.00012 and -(4 - 2.426)
      = -1.574;
    - azimuth 45: r = 0.5, half front half side; both at -(4 * 0.77880 - 2.426) = -0.68920;
    - azimuth 90: the side-back half, r = 1, all side; negatives side, front at -(0.60653 - 0.606) = -0.00053
      and -(0.60653 + 0.967) = -1.57353;
    - azimuth -135: r = 0.5, half side half back; -(0.77880 - 0.606) = -0.17280, -(0.77880 + 0.967) = -1.74580;
    - azimuth 180: r = 0, all back; -(1 - 0.606) = -0.394, -(1 + 0.967) = -1.967;
    - elevation 70 (overhead, above camera.overhead_threshold 60): the overhead prompt, no push (weights 0)."""
    cams = make_cameras(torch.tensor([0.0, 10.0, 0.0, 20.0, 0.0, 70.0]),
                        torch.tensor([0.0, 45.0, 90.0, -135.0, 180.0, 30.0]),
                        torch.full((6,), 2.0), torch.full((6,), 50.0), 8, 8)
    mix, rows, weights = perp_neg.view_weights(cams, CameraConfig(), SDConfig())
    expected_mix = torch.tensor([[1, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0.5, 0.5, 0, 0],
                                 [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.float64)
    assert torch.allclose(mix, expected_mix, atol=1e-12)
    assert rows.tolist() == [[F, S], [F, S], [S, F], [S, F], [S, F], [U, U]]
    expected = torch.tensor([[-0.00012, -1.574], [-0.68920, -0.68920], [-0.00053, -1.57353], [-0.17280, -1.74580],
                             [-0.394, -1.967], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(weights, expected, atol=2e-5)


def test_combine_by_hand():
    """uncond 0, positive (1, 0), one negative (1, 1) at weight -1, scale 2: e_pos = (1, 0), the negative's
    perpendicular part (0, 1), so 2 ((1, 0) - (0, 1)) = (2, -2); a second negative along e_pos adds nothing."""
    uncond = torch.zeros(1, 2)
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[[1.0, 1.0], [5.0, 0.0]]])
    out = perp_neg.combine(uncond, pos, neg, torch.tensor([[-1.0, -3.0]]), 2.0)
    assert torch.allclose(out, torch.tensor([[2.0, -2.0]]))
    shifted = perp_neg.combine(uncond + 1, pos + 1, neg + 1, torch.tensor([[-1.0, -3.0]]), 2.0)
    assert torch.allclose(shifted, torch.tensor([[3.0, -1.0]]))  # scores relative to the negative prompt's


def make_guidance(model_dir, **sd) -> StableDiffusionGuidance:
    cfg = GuidanceConfig(sd=SDConfig(model=str(model_dir), resolution=16, guidance_scale=7.5, **sd))
    return StableDiffusionGuidance(Config(guidance=cfg, prompt=PROMPT, seed=0), "cpu")


def cameras():
    return make_cameras(torch.tensor([10.0, 0.0, 70.0]), torch.tensor([45.0, -135.0, 30.0]),
                        torch.full((3,), 2.0), torch.full((3,), 50.0), 12, 12)


def test_off_the_guided_noise_is_classifier_free_guidance_bit_for_bit(tiny_sd_dir):
    """With perp_neg off (the default), the guided noise is uncond + s (cond - uncond) on each view's prompt,
    computed here from the UNet directly in the same batch layout: equal to the last bit."""
    g = make_guidance(tiny_sd_dir)
    cams = cameras()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 500, 900])
    cond = torch.stack([g.prompts.cond[v] for v in view_names(cams, CameraConfig())])
    uncond = g.prompts.uncond.expand(3, *g.prompts.uncond.shape)
    with torch.no_grad():
        out = g.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
                     return_dict=False)[0].float()
    eps_uncond, eps_cond = out.chunk(2)
    assert torch.equal(g.guided_eps(x, t, cams), eps_uncond + 7.5 * (eps_cond - eps_uncond))


def test_on_the_guided_noise_follows_the_hand_mixed_prompts(tiny_sd_dir):
    """With perp_neg on, each camera's positive prompt is the hand-mixed embedding (azimuth 45: half front,
    half side; -135: half side, half back; overhead: the overhead prompt), the negatives the pure views', and
    the result their Perp-Neg combination of UNet predictions made here one prompt at a time. The UNet runs
    on batches of 3 here and 12 inside, so float32 differs in the last bits, which the scale (7.5) enlarges:
    measured max abs error 1.7e-5 on entries up to 1.32; tolerance 2e-4."""
    g = make_guidance(tiny_sd_dir, perp_neg=True)
    cams = cameras()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 500, 900])
    c = g.prompts.cond
    pos = torch.stack([0.5 * c["front"] + 0.5 * c["side"], 0.5 * c["side"] + 0.5 * c["back"], c["overhead"]])
    uncond = g.prompts.uncond.expand(3, *g.prompts.uncond.shape)
    negs = [torch.stack([c["front"], c["side"], g.prompts.uncond]), torch.stack([c["side"], c["front"], g.prompts.uncond])]

    def eps(text):
        with torch.no_grad():
            return g.unet(x, t, encoder_hidden_states=text, return_dict=False)[0].float()

    f = lambda abc, r: abc[0] * math.exp(-abc[1] * r) + abc[2]  # noqa: E731
    sd = g.sd
    weights = torch.tensor([[-f(sd.perp_neg_f_fs, 0.5), -f(sd.perp_neg_f_sf, 0.5)],
                            [-f(sd.perp_neg_f_sb, 0.5), -f(sd.perp_neg_f_fsb, 0.5)], [0.0, 0.0]])
    e_u, e_p = eps(uncond), eps(pos)
    e_pos = e_p - e_u
    push = sum(weights[:, i].view(-1, 1, 1, 1) * perp_neg.perpendicular_component(eps(negs[i]) - e_u, e_pos)
               for i in range(2))
    expected = e_u + 7.5 * (e_pos + push)
    out = g.guided_eps(x, t, cams)
    assert torch.allclose(out, expected, atol=2e-4)
    assert not torch.allclose(out, make_guidance(tiny_sd_dir).guided_eps(x, t, cams), atol=1e-3)
    # the overhead view has no push: its Perp-Neg noise is plain classifier-free guidance
    assert torch.allclose(out[2], (e_u + 7.5 * e_pos)[2], atol=2e-4)


def test_perp_neg_needs_view_dependent_prompts():
    with pytest.raises(UserError, match="guidance.sd.perp_neg.*view_dependent_prompting=true"):
        build_config("dreamfusion-sd", ["guidance.sd.perp_neg=true", "guidance.view_dependent_prompting=false"])


def test_the_perp_neg_preset_is_dreamfusion_sd_with_perp_neg_on():
    """Perp-Neg on, and threestudio's scale 100 in the usual form its Perp-Neg branch uses (without Perp-Neg
    threestudio adds the scale to the text prediction: 101 in threed's form, dreamfusion-sd's value)."""
    plain, perp = (flatten(to_dict(build_config(p))) for p in ("dreamfusion-sd", "dreamfusion-sd-perpneg"))
    assert perp["guidance.sd.perp_neg"] is True and plain["guidance.sd.perp_neg"] is False
    assert (plain["guidance.sd.guidance_scale"], perp["guidance.sd.guidance_scale"]) == (101.0, 100.0)
    assert {k for k in plain if plain[k] != perp[k]} == {"guidance.sd.perp_neg", "guidance.sd.guidance_scale"}


def test_a_tiny_run_with_perp_neg_trains(tiny_sd_dir, tmp_path, capsys):
    """`threed run` with guidance.sd.perp_neg=true on the tiny SD: trains, logs finite losses, writes a mesh.
    (SD's input at 64 px: at the preset's 256 the tiny VAE's 128² latents make the attention take minutes.)"""
    import json

    from threed.cli import main

    out = tmp_path / "duck"
    code = main(["run", "--prompt", PROMPT, "--preset", "cpu-tiny", "--model", str(tiny_sd_dir), "--steps", "3",
                 "--device", "cpu", "--out", str(out), "--quiet", "guidance.sd.perp_neg=true", "log_every=1",
                 "guidance.sd.resolution=64", "export.video=false", "export.preview_views=0"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (out / "mesh.obj").is_file()
