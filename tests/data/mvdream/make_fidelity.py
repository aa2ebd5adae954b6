"""Make the MVDream port's fidelity data (tests/test_mvdream_unet.py reads it; the tests never run this).

It runs bytedance/MVDream's own MultiViewUNetModel (mvdream/ldm/modules/diffusionmodules/openaimodel.py,
without xformers: its plain softmax attention) on a tiny configuration with random weights and fixed
inputs, in float32 on the CPU, and writes:

- tiny-unet.yaml: the tiny configuration (the keys of sd-v2-base.yaml's unet_config, smaller);
- tiny-unet.safetensors: its state dict in the official key layout (`model.diffusion_model.` + the
  reference module's own keys, as in sd-v2.1-base-4view.pt);
- tiny-unet-io.safetensors: the inputs (x, timesteps, context, camera; num_frames = 4, two objects of four
  views) and the reference's outputs, `out` and `out_no_camera` (the same with camera=None).

Weights: the module's own initialisation (torch.manual_seed(0)), then every parameter plus 0.05 N(0, 1)
noise so that the zero-initialised layers (proj_out, each ResBlock's last conv, the output conv) and the
norms' ones and zeros are not special values a wrong mapping could hide behind, rounded to float16 (the file
stores float16; the reference ran in float32 on exactly those values).

Usage (the reference needs torch, einops and omegaconf; xformers must be absent):
    git clone https://github.com/bytedance/MVDream /tmp/mvdream-ref
    python tests/data/mvdream/make_fidelity.py /tmp/mvdream-ref
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent

TINY = {
    "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2],
    "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 32, "use_checkpoint": False, "legacy": False, "camera_dim": 16,
}


def main(ref_root: str) -> None:
    sys.path.insert(0, ref_root)
    from mvdream.camera_utils import get_camera, normalize_camera
    from mvdream.ldm.modules import attention
    from mvdream.ldm.modules.diffusionmodules.openaimodel import MultiViewUNetModel

    assert not attention.XFORMERS_IS_AVAILBLE, "run without xformers: its plain attention is the reference"
    torch.manual_seed(0)
    model = MultiViewUNetModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())  # stored as float16, exactly

    g = torch.Generator().manual_seed(1)
    frames, objects = 4, 2
    n = frames * objects
    x = torch.randn(n, 4, 8, 8, generator=g)
    timesteps = torch.tensor([20] * frames + [730] * frames, dtype=torch.long)
    context = torch.randn(objects, 7, TINY["context_dim"], generator=g).repeat_interleave(frames, 0)
    camera = torch.cat([get_camera(frames, elevation=15, azimuth_start=0),
                        get_camera(frames, elevation=30, azimuth_start=45)])
    camera = normalize_camera(camera * torch.tensor([1.0, 1, 1, 2.5] * 3 + [1.0] * 4)).float()
    with torch.no_grad():
        out = model(x, timesteps=timesteps, context=context, camera=camera, num_frames=frames)
        out_no_camera = model(x, timesteps=timesteps, context=context, camera=None, num_frames=frames)

    state = {"model.diffusion_model." + k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(HERE / "tiny-unet.safetensors"))
    save_file({"x": x, "timesteps": timesteps, "context": context, "camera": camera, "out": out.contiguous(),
               "out_no_camera": out_no_camera.contiguous()},
              str(HERE / "tiny-unet-io.safetensors"))
    (HERE / "tiny-unet.yaml").write_text(yaml.safe_dump({"unet_config": {"params": TINY}}, sort_keys=False))
    print(f"{sum(p.numel() for p in model.parameters())} parameters; |out| max {out.abs().max():.3f}; "
          f"wrote {HERE}")


if __name__ == "__main__":
    main(sys.argv[1])
