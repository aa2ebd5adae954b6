"""Loading Zero-1-to-3 (Zero123, Zero123-XL, Stable Zero123) in either of the layouts it is published in.

- diffusers layout (the community pipeline `pipeline_zero1to3`'s): a folder or hub id with `unet` (a
  UNet2DConditionModel taking 8 input channels: the noisy latent and the reference image's latent), `vae`,
  `image_encoder` (CLIPVisionModelWithProjection), `scheduler`, and the projection that joins the CLIP image
  embedding with the relative camera: `cc_projection` (CCProjection: `projection`, Linear(768 + 4 -> 768)) or
  `clip_camera_projection` (CLIPCameraProjection: `proj`, the same Linear).
- latent-diffusion checkpoint (`zero123-xl.ckpt`, `stable_zero123.ckpt`, as threestudio loads them): one file
  with `model.diffusion_model.*` (the UNet), `first_stage_model.*` (the VAE), `cc_projection.*`, and EMA
  weights where present (threestudio copies them over the model's: so do we). The architecture is that of
  threestudio's load/zero123/sd-objaverse-finetune-c_concat-256.yaml (ZERO123_LDM_CONFIG, or a YAML passed as
  guidance.zero123.config); diffusers' own LDM -> diffusers conversion maps the keys. The checkpoint holds no
  CLIP image encoder in diffusers' form: it is taken from guidance.zero123.image_encoder (OpenAI's
  ViT-L/14, which Zero123's frozen FrozenCLIPImageEmbedder is).

Both give the same `Zero123Parts`, so the guidance never knows which layout it came from.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from threed.errors import UserError, first_line
from threed.guidance.hub import resolve_pretrained

# The architecture of every Zero123 checkpoint (threestudio's sd-objaverse-finetune-c_concat-256.yaml):
# Stable Diffusion 1.x's UNet with 8 input channels, its VAE, its noise schedule.
ZERO123_LDM_CONFIG: dict = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "unet_config": {"params": {
        "image_size": 32, "in_channels": 8, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "legacy": False}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}}}
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
DIFFUSERS_PARTS = ("unet", "vae", "image_encoder")
LOCAL_HINT = "--model /path/to/a/zero123/diffusers/folder or /path/to/stable_zero123.ckpt"


@dataclass
class Zero123Parts:
    """The networks of a Zero123 model, frozen and in eval mode, on the CPU in float32 until moved."""

    unet: nn.Module  # UNet2DConditionModel, 8 input channels
    vae: nn.Module  # AutoencoderKL
    image_encoder: nn.Module  # CLIPVisionModelWithProjection
    projection: nn.Linear  # (image embedding, 4 camera numbers) -> the UNet's cross-attention context
    alphas_cumprod: Tensor  # (T,) the noise schedule
    latent_scale: float  # the VAE latents' scaling factor (0.18215)
    source: str  # the folder or file it came from

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.image_encoder, self.projection]


def is_checkpoint_file(model: str) -> bool:
    return Path(model).suffix.lower() in CHECKPOINT_SUFFIXES


def load_zero123(model: str, image_encoder: str = "", config: str = "") -> Zero123Parts:
    """The model `model` names: a checkpoint file (latent-diffusion keys), a diffusers folder or a hub id.
    `image_encoder` (hub id or folder of a CLIPVisionModelWithProjection) is what a checkpoint is paired
    with, and replaces a folder's own `image_encoder` where given; `config` is a latent-diffusion YAML for a
    checkpoint of another architecture than Zero123's."""
    model = str(model).strip()
    if not model:
        raise UserError(f"no Zero123 model given: pass a Hugging Face hub id or {LOCAL_HINT}")
    if is_checkpoint_file(model) or Path(model).expanduser().is_file():
        return _from_checkpoint(Path(model).expanduser(), image_encoder, config)
    return _from_diffusers(model, image_encoder)


def _quiet_load(fn):
    """Run a loader with diffusers' and transformers' per-load bars and notices off."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    verbosity = diffusers_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return fn()
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _state_file(folder: Path) -> Path | None:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def projection_from_state(state: dict, prefix_options: tuple[str, ...], where: str) -> nn.Linear:
    """The camera projection Linear from a state dict whose keys are `<prefix>.weight` and `<prefix>.bias` for
    one of `prefix_options`."""
    for prefix in prefix_options:
        if f"{prefix}.weight" in state:
            weight, bias = state[f"{prefix}.weight"].float(), state[f"{prefix}.bias"].float()
            layer = nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": bias})
            return layer
    raise UserError(f"{where} holds no camera projection ({' or '.join(p + '.weight' for p in prefix_options)}): "
                    f"pass a Zero123 model")


def _image_encoder_path(name: str, fallback: Path | None) -> Path:
    """Where the CLIP image encoder is: `name` (hub id or folder), else `fallback`, else OpenAI's ViT-L/14."""
    if not name and fallback is not None:
        return fallback
    return Path(resolve_pretrained(name or DEFAULT_IMAGE_ENCODER, "CLIP image encoder (guidance.zero123.image_encoder)",
                                   required=("config.json",), extra_patterns=("model.safetensors",),
                                   local_hint="guidance.zero123.image_encoder=/path/to/a/CLIP/vision/folder"))


def _image_encoder(path: Path) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    try:
        return _quiet_load(lambda: CLIPVisionModelWithProjection.from_pretrained(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the CLIP image encoder from '{path}': {first_line(e)}; pass a "
                        f"CLIPVisionModelWithProjection folder or hub id as guidance.zero123.image_encoder") from None


# OpenAI's CLIP ViT-L/14: the image encoder Zero123 was trained with (frozen), for checkpoints, which lack it.
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"


def _from_diffusers(model: str, image_encoder: str) -> Zero123Parts:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    required = DIFFUSERS_PARTS if not image_encoder else ("unet", "vae")
    folder = Path(resolve_pretrained(model, "Zero123", required=required,
                                     extra_patterns=tuple(f"{p}/*" for p in PROJECTION_FOLDERS) + ("scheduler/*",),
                                     local_hint=LOCAL_HINT))
    projection_dir = next((folder / p for p in PROJECTION_FOLDERS if (folder / p).is_dir()), None)
    if projection_dir is None or _state_file(projection_dir) is None:
        raise UserError(f"Zero123 model '{model}' has no camera projection ({' or '.join(PROJECTION_FOLDERS)} with "
                        f"weights): pass a Zero123 diffusers folder (e.g. kxic/zero123-xl) or a .ckpt file")
    try:
        unet = _quiet_load(lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
        vae = _quiet_load(lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae"))
        state = _read_state(_state_file(projection_dir))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load Zero123 from '{folder}': {first_line(e)}; pass a complete diffusers folder, "
                        f"a hub id or a .ckpt file") from None
    projection = projection_from_state(state, ("projection", "proj"), str(projection_dir))
    if (folder / "scheduler").is_dir():
        alphas = DDIMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod.float()
    else:
        from threed.guidance.sds import sd_alphas_cumprod

        alphas = sd_alphas_cumprod()
    encoder = _image_encoder(_image_encoder_path(image_encoder, folder / "image_encoder"))
    return _finish(Zero123Parts(unet, vae, encoder, projection, alphas, float(vae.config.scaling_factor),
                                str(folder)))


def _load_checkpoint_state(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import pickle

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A PyTorch Lightning checkpoint may hold objects besides tensors (its trainer's state); reading those
        # runs the file's pickle code: only for a checkpoint the user chose, as threestudio reads them.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt


def _from_checkpoint(path: Path, image_encoder: str, config: str) -> Zero123Parts:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_unet_checkpoint,
                                                                        convert_ldm_vae_checkpoint,
                                                                        create_unet_diffusers_config,
                                                                        create_vae_diffusers_config)

    if not path.is_file():
        raise UserError(f"Zero123 checkpoint '{path}' not found: download it (e.g. stable_zero123.ckpt from "
                        f"stabilityai/stable-zero123 on the Hugging Face hub) or pass a hub id of a diffusers "
                        f"Zero123 (e.g. kxic/zero123-xl)")
    ldm = load_ldm_config(config)
    encoder_path = _image_encoder_path(image_encoder, None)  # before the long read: offline fails in seconds
    try:
        state = _load_checkpoint_state(path)
    except Exception as e:  # torch and safetensors raise many types for a broken file
        raise UserError(f"cannot read the Zero123 checkpoint '{path}' ({first_line(e)}): pass a latent-diffusion "
                        f".ckpt or .safetensors file") from None
    if not isinstance(state, dict) or not any(k.startswith("model.diffusion_model.") for k in state):
        raise UserError(f"'{path}' is not a latent-diffusion checkpoint (no model.diffusion_model.* weights): pass "
                        f"a Zero123 .ckpt such as stable_zero123.ckpt")
    params = ldm["model"]["params"]
    image_size = 8 * int(params["unet_config"]["params"].get("image_size", 32))
    try:
        unet_config = create_unet_diffusers_config(ldm, image_size=image_size)
        unet_config["upcast_attention"] = False
        vae_config = create_vae_diffusers_config(ldm, image_size=image_size)
        vae_config["scaling_factor"] = float(params.get("scale_factor", 0.18215))
        logger = logging.getLogger("diffusers.pipelines.stable_diffusion.convert_from_ckpt")
        previous, logger.disabled = logger.disabled, True
        try:
            unet_state = convert_ldm_unet_checkpoint(state, unet_config, extract_ema=True)
        finally:
            logger.disabled = previous
        vae_state = convert_ldm_vae_checkpoint(state, vae_config)
        unet = UNet2DConditionModel(**unet_config)
        unet.load_state_dict(unet_state)
        vae = AutoencoderKL(**vae_config)
        vae.load_state_dict(vae_state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"the checkpoint '{path}' does not match the Zero123 architecture ({first_line(e)}): pass "
                        f"its latent-diffusion YAML as guidance.zero123.config") from None
    projection = projection_from_state(state, ("cc_projection",), str(path))
    from threed.guidance.sds import sd_alphas_cumprod

    alphas = sd_alphas_cumprod(int(params.get("timesteps", 1000)), float(params["linear_start"]),
                               float(params["linear_end"]))
    encoder = _image_encoder(encoder_path)
    return _finish(Zero123Parts(unet, vae, encoder, projection, alphas, vae_config["scaling_factor"], str(path)))


def load_ldm_config(config: str) -> dict:
    """ZERO123_LDM_CONFIG, or a latent-diffusion YAML (model.params with unet_config, first_stage_config)."""
    if not config:
        return copy.deepcopy(ZERO123_LDM_CONFIG)
    import yaml

    path = Path(config).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
        data["model"]["params"]["unet_config"]["params"]
        data["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the latent-diffusion config '{config}' ({first_line(e)}): pass a YAML with "
                        f"model.params.unet_config and first_stage_config, or none for Zero123's") from None
    return data


def _finish(parts: Zero123Parts) -> Zero123Parts:
    for module in parts.modules():
        module.requires_grad_(False)
        module.eval()
    return parts


__all__ = ["CHECKPOINT_SUFFIXES", "DEFAULT_IMAGE_ENCODER", "ZERO123_LDM_CONFIG", "Zero123Parts", "is_checkpoint_file",
           "load_ldm_config", "load_zero123", "projection_from_state"]
