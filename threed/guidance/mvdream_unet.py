"""MVDream's multi-view UNet: Stable Diffusion 2.1's UNet denoising the views of one object together.

MVDream (Shi et al. 2023, bytedance/MVDream) fine-tunes SD 2.1-base with two changes, both expressible in
diffusers' UNet2DConditionModel:

- the camera (a flattened 4x4 camera-to-world matrix, 16 numbers) passes through a linear-SiLU-linear MLP
  and is added to the time embedding: diffusers' `class_embed_type="projection"` is that MLP, fed the camera
  as its "class labels";
- each transformer's self-attention (attn1) attends over the tokens of all `num_frames` views of an object
  at once (the batch is objects x views, views innermost), so the views agree; cross-attention to the text
  and everything else stays per view. `MultiViewAttnProcessor` does this by regrouping the tokens before
  the attention and back after it, which is exact since q, k, v and the output projection act per token.

Everything else is SD 2.1-base as diffusers has it: the timestep embedding cos-first (flip_sin_to_cos,
no frequency shift, as the reference's `timestep_embedding`), linear proj_in/proj_out, 64 channels per
attention head (diffusers' `attention_head_dim` holds the number of heads for SD 2.x), GEGLU feed-forward,
GroupNorm eps 1e-5 in the ResNet blocks and 1e-6 in the transformers. tests/test_mvdream_unet.py checks it
against the reference implementation's outputs.

The reference's weights come in the latent-diffusion layout; `unet_config` and `convert_unet` map its
`unet_config` parameters and state dict onto this module (diffusers' own LDM conversion, with the camera
MLP's keys renamed onto the class embedding's).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor

# The checkpoint's key prefix of the UNet (latent diffusion's `model.diffusion_model.`).
LDM_UNET_PREFIX = "model.diffusion_model."
# threed's scene frame (y up, front towards +z) into the one MVDream-threestudio hands the model its cameras
# in (threestudio's: z up, front towards +x): x -> y, y -> z, z -> x, a rotation.
TO_THREESTUDIO = ((0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))


def camera_condition(c2w: Tensor) -> Tensor:
    """The UNet's camera input for threed's camera-to-world matrices (B, 4, 4): each camera as
    MVDream-threestudio gives it (its c2w in threestudio's frame, OpenGL camera axes; the position scaled
    onto the unit sphere, mvdream.camera_utils.normalize_camera), flattened row-major to (B, 16).

    bytedance/MVDream's own get_camera(elevation, azimuth) builds the same matrices in a frame turned 90
    degrees about the up axis: threed's (and threestudio's) azimuth a is its azimuth a + 90."""
    m = torch.tensor(TO_THREESTUDIO, dtype=c2w.dtype, device=c2w.device) @ c2w
    position = m[:, :3, 3]
    m = m.clone()
    m[:, :3, 3] = position / (position.norm(dim=-1, keepdim=True) + 1e-8)
    return m.reshape(-1, 16)


class MultiViewAttnProcessor:
    """Scaled dot-product attention where self-attention spans the `num_frames` views of each object."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, num_frames: int = 1) -> Tensor:
        assert attention_mask is None, "MVDream's UNet attends without masks"
        if encoder_hidden_states is None:  # self-attention: one sequence per object, its views' tokens in a row
            bf, n, c = hidden_states.shape
            if bf % num_frames:
                raise ValueError(f"a batch of {bf} is not whole objects of {num_frames} views")
            grouped = hidden_states.reshape(bf // num_frames, num_frames * n, c)
            return self._attend(attn, grouped, grouped).reshape(bf, n, -1)
        return self._attend(attn, hidden_states, encoder_hidden_states)

    @staticmethod
    def _attend(attn: Any, x: Tensor, context: Tensor) -> Tensor:
        b, h = x.shape[0], attn.heads
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        if attn.upcast_attention:
            dtype = q.dtype
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        if attn.upcast_attention:
            out = out.to(dtype)
        out = out.transpose(1, 2).reshape(b, -1, h * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


class MultiViewUNet(UNet2DConditionModel):
    """diffusers' UNet2DConditionModel with MVDream's camera embedding and multi-view self-attention.

    Its config is a UNet2DConditionModel's with `class_embed_type="projection"` and
    `projection_class_embeddings_input_dim=16`; it saves and loads with save_pretrained/from_pretrained."""

    @functools.wraps(UNet2DConditionModel.__init__)  # its signature: diffusers' from_config reads it
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_attn_processor(MultiViewAttnProcessor())

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                camera: Tensor | None = None, num_frames: int = 1, **kwargs: Any) -> Tensor:  # type: ignore[override]
        """The noise prediction for `sample` [(objects x num_frames), C, H, W] (views innermost), with
        `camera` [(objects x num_frames), 16] the flattened camera-to-world matrices in MVDream's convention
        (`camera_condition`). Without a camera, no camera term (the reference's camera=None)."""
        kwargs["cross_attention_kwargs"] = {"num_frames": num_frames}
        if camera is not None or self.class_embedding is None:
            labels = None if camera is None else camera.to(sample.dtype)
            return super().forward(sample, timestep, encoder_hidden_states, class_labels=labels, **kwargs).sample
        embedding, self.class_embedding = self.class_embedding, None  # diffusers would demand labels
        try:
            return super().forward(sample, timestep, encoder_hidden_states, **kwargs).sample
        finally:
            self.class_embedding = embedding


def unet_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """MultiViewUNet's config from the reference's `unet_config.params` (mvdream/configs/sd-v2-base.yaml):
    the same network in diffusers' terms."""
    supported = {"use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False}
    for key, value in supported.items():
        if params.get(key, value) != value:
            raise ValueError(f"MVDream's UNet with {key}={params[key]} is not supported (only {value})")
    if params.get("num_head_channels", -1) <= 0:
        raise ValueError("MVDream's UNet needs num_head_channels (SD 2.x: 64)")
    attention = set(params["attention_resolutions"])
    mc, mults = int(params["model_channels"]), [int(m) for m in params["channel_mult"]]
    levels = len(mults)
    cross = [2 ** level in attention for level in range(levels)]
    return {
        "sample_size": int(params.get("image_size", 32)),
        "in_channels": int(params["in_channels"]),
        "out_channels": int(params["out_channels"]),
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "block_out_channels": [mc * m for m in mults],
        "layers_per_block": int(params["num_res_blocks"]),
        "cross_attention_dim": int(params["context_dim"]),
        # diffusers' attention_head_dim for SD 2.x is the number of heads per level.
        "attention_head_dim": [mc * m // int(params["num_head_channels"]) for m in mults],
        "use_linear_projection": True,
        "transformer_layers_per_block": int(params.get("transformer_depth", 1)),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": int(params["camera_dim"]),
    }


def convert_unet(state: Mapping[str, Tensor], config: Mapping[str, Any],
                 prefix: str = LDM_UNET_PREFIX) -> dict[str, Tensor]:
    """The reference's UNet weights (keys under `prefix`) in MultiViewUNet's layout. Every tensor is used
    once; `unused_unet_keys` names any the mapping left out."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    renamed = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        local = key[len(prefix):]
        if local.startswith("camera_embed."):  # Sequential(linear, SiLU, linear) -> diffusers' label_emb.0
            local = "label_emb.0." + local[len("camera_embed."):]
        renamed[LDM_UNET_PREFIX + local] = value
    return convert_ldm_unet_checkpoint(renamed, dict(config))


def unused_unet_keys(state: Mapping[str, Tensor], converted: Mapping[str, Tensor],
                     prefix: str = LDM_UNET_PREFIX) -> list[str]:
    """The keys under `prefix` whose tensors `convert_unet` did not carry over (it moves tensors, never
    copies them, so identity tells)."""
    used = {id(v) for v in converted.values()}
    return sorted(k for k, v in state.items() if k.startswith(prefix) and id(v) not in used)


def load_unet(state: Mapping[str, Tensor], params: Mapping[str, Any], prefix: str = LDM_UNET_PREFIX,
              dtype: torch.dtype = torch.float32) -> MultiViewUNet:
    """MultiViewUNet from the reference's `unet_config.params` and a state dict in its layout (all keys
    must match: a missing or unexpected one is an error)."""
    config = unet_config(params)
    converted = convert_unet(state, config, prefix)
    left = unused_unet_keys(state, converted, prefix)
    if left:
        raise ValueError(f"{len(left)} UNet weights of the checkpoint map nowhere, e.g. {left[0]}")
    with torch.device("meta"):
        model = MultiViewUNet(**config)
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return model.eval()
