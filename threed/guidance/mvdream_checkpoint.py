"""MVDream's official checkpoint onto threed's modules: one latent-diffusion file, three diffusers-style parts.

`sd-v2.1-base-4view.pt` (hub MVDream/MVDream, about 5 GB) is the state dict of bytedance/MVDream's
LatentDiffusionInterface: the multi-view UNet under `model.diffusion_model.`, SD 2.1's VAE under
`first_stage_model.`, OpenCLIP ViT-H-14's text tower under `cond_stage_model.model.`, and the DDPM schedule's
buffers (`betas`, `alphas_cumprod`, ...). `split_checkpoint` maps every key:

- the UNet onto MultiViewUNet (threed/guidance/mvdream_unet.py, diffusers' LDM conversion);
- the VAE onto diffusers' AutoencoderKL (diffusers' LDM conversion; its 1x1-conv attention becomes linear);
- the text tower onto transformers' CLIPTextModel with 23 of its 24 layers: SD 2 and MVDream condition on
  the penultimate layer's output after the final LayerNorm (the reference's `layer: penultimate`), which is a
  23-layer model's last hidden state. The 24th layer, `text_projection` and `logit_scale` serve only CLIP's
  pooled embedding and are not used (`IGNORED`);
- the schedule's buffers are not loaded: threed uses diffusers' DDPMScheduler with the same betas (the
  reference's "linear" schedule, linspace of square roots squared, is diffusers' "scaled_linear"); the loader
  checks they agree.

A folder holding the .pt (and optionally the reference's .yaml config) works, and so does a folder of the three
modules as threed saves them (unet/, vae/, text_encoder/ with save_pretrained; threed/random_models.py
writes one for speed measurements). The community diffusers conversions on the hub (e.g.
ashawkey/mvdream-sd2.1-diffusers) are not read: the authors publish only the .pt, and those conversions are
unmaintained and bring UNet classes of their own as remote code.

The tokenizer is open_clip's own (its BPE vocabulary ships with the package), as the reference uses.
tests/test_mvdream_checkpoint.py maps the official key list (tests/data/mvdream/official-keys.txt.gz)
onto the three modules: nothing missing, nothing left over, shapes equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from threed.errors import UserError, first_line
from threed.guidance.hub import WITHOUT_WEIGHTS_HINT, hf_cache_dir, hub_offline, hub_reachable, looks_like_path
from threed.guidance.mvdream_unet import (LDM_UNET_PREFIX, MultiViewUNet, convert_unet, unet_config,
                                          unused_unet_keys)

# bytedance/MVDream's model_zoo: the SD 2.1-base model's hub repository and file.
DEFAULT_MODEL = "MVDream/MVDream"
CHECKPOINT_FILE = "sd-v2.1-base-4view.pt"
WEIGHT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")

VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")

# mvdream/configs/sd-v2-base.yaml, unet_config.params.
SD21_UNET: dict[str, Any] = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 1024, "use_checkpoint": False, "legacy": False, "camera_dim": 16,
}
# OpenCLIP ViT-H-14's text tower as a CLIPTextModel, one layer short (the penultimate layer's output).
SD21_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 1024,
}
# sd-v2-base.yaml's model.params, as far as threed reads them (the reference's config format).
SD21_PARAMS: dict[str, Any] = {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "parameterization": "eps", "unet_config": {"params": SD21_UNET},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}


@dataclass
class Parts:
    """A checkpoint's tensors per module (each in that module's key layout), and what was not mapped."""

    unet: dict[str, Tensor] = field(default_factory=dict)
    vae: dict[str, Tensor] = field(default_factory=dict)
    text: dict[str, Tensor] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # keys deliberately not loaded (see the module docstring)
    unused: list[str] = field(default_factory=list)  # keys nothing maps: an unexpected checkpoint


def text_layers(state: Mapping[str, Tensor]) -> int:
    """The number of residual blocks of the checkpoint's text tower."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def convert_text(state: Mapping[str, Tensor], layers: int, into: str = "") -> tuple[dict[str, Tensor], set[str]]:
    """The text tower's first `layers` blocks, embeddings and final LayerNorm in CLIPTextModel's layout (its
    keys prefixed `into`: transformers 4 has `text_model.`, 5 none), and the checkpoint keys that went into it.
    open_clip packs q, k and v in one in_proj; CLIP keeps three."""
    p, out, used = TEXT_PREFIX, {}, set()

    def take(src: str, dst: str) -> None:
        if p + src in state:
            out[into + dst] = state[p + src]
            used.add(p + src)

    take("token_embedding.weight", "embeddings.token_embedding.weight")
    take("positional_embedding", "embeddings.position_embedding.weight")
    take("ln_final.weight", "final_layer_norm.weight")
    take("ln_final.bias", "final_layer_norm.bias")
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in names.items():
            for kind in ("weight", "bias"):
                take(f"{src}{a}.{kind}", f"{dst}{b}.{kind}")
        for kind in ("weight", "bias"):
            key = f"{p}{src}attn.in_proj_{kind}"
            if key in state:
                for name, part in zip(("q", "k", "v"), state[key].chunk(3, dim=0)):
                    out[f"{into}{dst}self_attn.{name}_proj.{kind}"] = part
                used.add(key)
    return out, used


def convert_vae(state: Mapping[str, Tensor], config: Mapping[str, Any])  -> tuple[dict[str, Tensor], set[str]]:
    """The autoencoder in diffusers' layout, and the checkpoint keys that went into it (by tensor identity:
    diffusers' conversion moves tensors or takes views of them)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    own = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    out = convert_ldm_vae_checkpoint(own, dict(config))
    sources = {id(v) for v in out.values()} | {id(v._base) for v in out.values() if v._base is not None}
    return out, {k for k, v in own.items() if id(v) in sources}


def split_checkpoint(state: Mapping[str, Tensor], params: Mapping[str, Any] = SD21_PARAMS,
                     text_into: str = "") -> Parts:
    """Every key of an MVDream checkpoint, mapped onto the UNet, the VAE, the text encoder (keys prefixed
    `text_into`, see `text_key_prefix`), or `ignored`; whatever is left is `unused`."""
    parts = Parts()
    parts.unet = convert_unet(state, unet_config(params["unet_config"]["params"]))
    used = {k for k in state if k.startswith(LDM_UNET_PREFIX)} - set(unused_unet_keys(state, parts.unet))
    parts.vae, vae_used = convert_vae(state, vae_config(params))
    layers = text_layers(state)
    parts.text, text_used = convert_text(state, layers - 1, text_into)  # the penultimate layer's output
    used |= vae_used | text_used
    last = f"{TEXT_PREFIX}transformer.resblocks.{layers - 1}."
    ignored = {k for k in state if k in SCHEDULE_BUFFERS or k.startswith(last)
               or k in (TEXT_PREFIX + "text_projection", TEXT_PREFIX + "logit_scale")}
    parts.ignored = sorted(ignored)
    parts.unused = sorted(set(state) - used - ignored)
    return parts


def vae_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' AutoencoderKL config from the reference's first_stage_config (its ddconfig)."""
    dd = params["first_stage_config"]["params"]["ddconfig"]
    levels = len(dd["ch_mult"])
    return {"in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
            "latent_channels": int(dd["z_channels"]), "layers_per_block": int(dd["num_res_blocks"]),
            "block_out_channels": [int(dd["ch"]) * int(m) for m in dd["ch_mult"]],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "sample_size": int(dd["resolution"]), "scaling_factor": float(params.get("scale_factor", 0.18215))}


def text_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """CLIPTextConfig of the checkpoint's text tower, one layer short, read off its shapes (open_clip's
    heads are width / 64)."""
    p = TEXT_PREFIX
    vocab, width = state[p + "token_embedding.weight"].shape
    return {"vocab_size": int(vocab), "hidden_size": int(width),
            "intermediate_size": int(state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": text_layers(state) - 1, "num_attention_heads": max(1, int(width) // 64),
            "max_position_embeddings": int(state[p + "positional_embedding"].shape[0]), "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "projection_dim": int(width)}


def text_key_prefix(text_encoder: Any) -> str:
    """CLIPTextModel's key prefix in the installed transformers ("text_model." before version 5)."""
    return "text_model." if any(k.startswith("text_model.") for k in text_encoder.state_dict()) else ""


def build_modules(params: Mapping[str, Any] = SD21_PARAMS, text: Mapping[str, Any] = SD21_TEXT,
                  device: str | torch.device = "meta") -> tuple[MultiViewUNet, Any, Any]:
    """The UNet, VAE and text encoder of `params` (the reference's model.params; default SD 2.1-base's) and
    the text config `text`, uninitialised on `device` (meta: no memory)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = MultiViewUNet(**unet_config(params["unet_config"]["params"]))
        vae = AutoencoderKL(**vae_config(params))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    return unet, vae, text_encoder


# -- finding and loading the checkpoint ---------------------------------------------------------------

def _missing(what: str) -> UserError:
    return UserError(f"{what}; download MVDream's checkpoint (about 5 GB) with `hf download {DEFAULT_MODEL} "
                     f"{CHECKPOINT_FILE}` on a machine with internet and pass --model with the hub id (from the "
                     f"cache) or the file's path; {WITHOUT_WEIGHTS_HINT}")


def resolve_checkpoint(model: str, revision: str = "") -> tuple[Path, Path | None]:
    """The checkpoint file `model` names, and its configuration (a YAML in the reference's format: None means
    SD 2.1-base's). `model` is a hub id (from the cache when there, else downloaded unless offline), a
    checkpoint file (its config: the same name with .yaml, if present), or a folder holding one checkpoint
    (sd-v2.1-base-4view.pt preferred) and at most one .yaml."""
    model = str(model).strip()
    if not model:
        raise _missing("no MVDream model given")
    if looks_like_path(model) or model.endswith(WEIGHT_SUFFIXES):
        path = Path(model).expanduser()
        if path.is_file():
            config = path.with_suffix(".yaml")
            return path, config if config.is_file() else None
        if not path.is_dir():
            raise _missing(f"MVDream checkpoint '{model}' does not exist")
        if (path / "unet" / "config.json").is_file():  # threed's own layout of the three modules
            return path, None
        files = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
        chosen = [f for f in files if f.name == CHECKPOINT_FILE] or files
        if len(chosen) != 1:
            raise _missing(f"MVDream folder '{model}' holds {len(files)} checkpoints ({', '.join(f.name for f in files) or 'none'})"
                           f"; pass the file itself")
        configs = sorted(path.glob("*.yaml"))
        if len(configs) > 1:
            raise UserError(f"MVDream folder '{model}' holds {len(configs)} .yaml configs; keep the model's one")
        return chosen[0], configs[0] if configs else None
    return _from_hub(model, revision.strip() or None), None


def _from_hub(model: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    try:
        cached = try_to_load_from_cache(model, CHECKPOINT_FILE, cache_dir=hf_cache_dir(), revision=revision)
    except ValueError:  # not a valid repository id
        raise _missing(f"MVDream model '{model}' is neither a file, a folder nor a hub id") from None
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline() or not hub_reachable():
        raise _missing(f"MVDream model '{model}' is not in the Hugging Face cache and the hub cannot be reached")
    try:
        return Path(hf_hub_download(model, CHECKPOINT_FILE, cache_dir=hf_cache_dir(), revision=revision))
    except RepositoryNotFoundError:
        raise _missing(f"MVDream model '{model}' does not exist on the Hugging Face hub") from None
    except EntryNotFoundError:
        raise _missing(f"hub repository '{model}' has no {CHECKPOINT_FILE}") from None
    except (HfHubHTTPError, OSError) as e:
        raise _missing(f"downloading MVDream model '{model}' failed ({first_line(e)})") from None


def read_params(config: Path | None) -> dict[str, Any]:
    """The reference's model.params from a YAML config (None: SD 2.1-base's, sd-v2-base.yaml)."""
    if config is None:
        return SD21_PARAMS
    import yaml

    try:
        params = yaml.safe_load(config.read_text())["model"]["params"]
        params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]  # noqa: B018
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"cannot read MVDream config '{config}' ({first_line(e)}); pass a config in the format of "
                        f"bytedance/MVDream's mvdream/configs/sd-v2-base.yaml, or remove it") from None
    return params


def read_state(path: Path) -> dict[str, Tensor]:
    """The checkpoint's tensors (memory-mapped where the format allows), a `state_dict` wrapper removed."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch and safetensors raise many kinds for a damaged or foreign file
        raise _missing(f"cannot read MVDream checkpoint '{path}' ({first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _missing(f"'{path}' holds no state dict")
    return state


def _materialise_buffers(module: torch.nn.Module) -> None:
    """Fill the buffers a checkpoint does not hold, which the meta-device construction left empty (CLIP's
    position ids)."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} is not in the checkpoint")
        owner = module.get_submodule(name.rpartition(".")[0])
        owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)


def _load_modules(folder: Path, dtype: torch.dtype) -> "MVDreamModel":
    """The three modules from a folder in threed's layout (unet/, vae/, text_encoder/, save_pretrained)."""
    import open_clip
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    try:
        unet = MultiViewUNet.from_pretrained(folder / "unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load MVDream from '{folder}' ({first_line(e)}); pass the {CHECKPOINT_FILE} "
                        f"checkpoint or a folder holding it") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    return MVDreamModel(unet, vae, text_encoder, open_clip.get_tokenizer("ViT-H-14"), scheduler, folder)


@dataclass
class MVDreamModel:
    """MVDream's parts, frozen and in eval mode: the multi-view UNet, the VAE, the text encoder (penultimate
    layer), open_clip's tokenizer and the DDPM scheduler."""

    unet: MultiViewUNet
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    path: Path


def load_mvdream(model: str = DEFAULT_MODEL, revision: str = "", dtype: torch.dtype = torch.float32) -> MVDreamModel:
    """MVDream from a hub id, a checkpoint file or a folder (`resolve_checkpoint`), on the CPU in `dtype`."""
    import open_clip
    from diffusers import DDPMScheduler

    path, config = resolve_checkpoint(model, revision)
    if path.is_dir():
        return _load_modules(path, dtype)
    params = read_params(config)
    state = read_state(path)
    if TEXT_PREFIX + "token_embedding.weight" not in state or LDM_UNET_PREFIX + "time_embed.0.weight" not in state:
        raise _missing(f"'{path}' is not an MVDream checkpoint (no {TEXT_PREFIX}* or {LDM_UNET_PREFIX}* weights)")
    try:
        unet, vae, text_encoder = build_modules(params, text_config(state))
        parts = split_checkpoint(state, params, text_key_prefix(text_encoder))
        if parts.unused:
            raise ValueError(f"{len(parts.unused)} weights map nowhere, e.g. {parts.unused[0]}")
        for module, weights in ((unet, parts.unet), (vae, parts.vae), (text_encoder, parts.text)):
            module.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
            _materialise_buffers(module)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"'{path}' does not match MVDream's architecture ({first_line(e)}); pass the "
                        f"{CHECKPOINT_FILE} checkpoint, with its .yaml config beside it if it is another size") from None
    scheduler = DDPMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)),
                              beta_start=float(params.get("linear_start", 0.00085)),
                              beta_end=float(params.get("linear_end", 0.012)), beta_schedule="scaled_linear",
                              prediction_type="epsilon")
    if "betas" in state and not torch.allclose(state["betas"].float(), scheduler.betas.float(), atol=1e-6):
        raise UserError(f"'{path}' was trained with another noise schedule than its config's; pass its .yaml config")
    if params.get("parameterization", "eps") != "eps":
        raise UserError(f"MVDream config of '{path}' predicts '{params['parameterization']}'; threed takes eps models")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    return MVDreamModel(unet, vae, text_encoder, open_clip.get_tokenizer("ViT-H-14"), scheduler, path)
