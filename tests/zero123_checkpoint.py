"""A Zero123 diffusers folder written back as a latent-diffusion checkpoint (the layout of zero123-xl.ckpt and
stable_zero123.ckpt): the key names of the original UNetModel (openaimodel) and AutoencoderKL (the LDM
`Encoder`/`Decoder`), so a test can load the same weights through both of threed's loaders. The names are
the inverse of diffusers' convert_from_ckpt mapping; a wrong name fails that conversion (it looks keys up)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    raise KeyError(key)


def unet_to_ldm(state: dict[str, torch.Tensor], levels: int, per_level: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> openaimodel UNetModel keys (model.diffusion_model.*)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("time_embedding."):
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
            names = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
            new = names[parts[0]] + "." + parts[1]
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{1 + i * (per_level + 1) + per_level}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                block = f"input_blocks.{1 + i * (per_level + 1) + j}"
                rest = ".".join(parts[4:])
                new = f"{block}.0.{_rename(rest, RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
            if kind == "upsamplers":
                new = (f"output_blocks.{i * (per_level + 1) + per_level}.{2 if has_attention else 1}.conv."
                       + ".".join(parts[5:]))
            else:
                j = int(parts[3])
                block = f"output_blocks.{i * (per_level + 1) + j}"
                rest = ".".join(parts[4:])
                new = f"{block}.0.{_rename(rest, RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_rename(rest, RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    assert levels >= 1
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the LDM autoencoder's (first_stage_model.*); attention projections back
    to 1x1 convolutions."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])
            where = "down" if side == "encoder" else "up"
            if parts[3] in ("downsamplers", "upsamplers"):
                new = f"{side}.{where}.{i}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
            else:
                new = f"{side}.{where}.{i}.block.{parts[4]}.{_rename('.'.join(parts[5:]), VAE_RESNET)}"
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{_rename(rest, VAE_RESNET)}"
            else:
                new = f"{side}.mid.attn_1.{_rename(rest, VAE_ATTN)}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def write_checkpoint(folder: Path, out: Path, ldm_config: dict) -> Path:
    """The Zero123 diffusers `folder` as a latent-diffusion checkpoint `out` ({"state_dict": ...}), with the
    CLIP image encoder left out (checkpoints are paired with one: guidance.zero123.image_encoder)."""
    unet = ldm_config["model"]["params"]["unet_config"]["params"]
    ddconfig = ldm_config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    state = unet_to_ldm(_weights(folder / "unet"), len(unet["channel_mult"]), int(unet["num_res_blocks"]))
    state.update(vae_to_ldm(_weights(folder / "vae"), len(ddconfig["ch_mult"])))
    projection = _weights(folder / "cc_projection")
    state["cc_projection.weight"] = projection["projection.weight"]
    state["cc_projection.bias"] = projection["projection.bias"]
    torch.save({"state_dict": state, "global_step": 0}, out)
    return out
