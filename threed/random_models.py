"""Random-weight models, for tests and speed measurement only.

They are saved to disk in the layouts users download (a diffusers Stable Diffusion folder, a CLIP
tokenizer), so they exercise the same loading code as real weights. Their outputs mean nothing: tests
check plumbing and mathematics with them, and benchmarks time them (the cost of a network does not
depend on its weight values); never read image quality from them.

- `build_tiny_sd`: a tiny Stable Diffusion (milliseconds per step on a CPU), for tests.
- `build_random_sd`: Stable Diffusion's real-size architecture from config files, for step timings.
- `build_clip_tokenizer`: CLIP's real BPE vocabulary, built offline from the merges open_clip ships.
- `write_random_mvdream`: an MVDream checkpoint in the official file layout from a recorded key list
  (tests/data/mvdream/: official-keys.txt.gz at full size, tiny-keys.txt.gz with tiny-model.yaml).
- `build_random_mvdream`: MVDream's modules (real size, or tiny) saved in threed's folder layout, for step
  timings without the key list.
- `build_zero123`: a Zero123 diffusers folder (UNet with 8 input channels, VAE, CLIP image encoder, camera
  projection) with tiny or real-size architecture (`tiny_zero123_ldm_config`, Zero123's own).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch

CLIP_CONTEXT = 77
CLIP_VOCAB = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (printable bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order is the vocabulary order: printable bytes first


def write_clip_bpe_files(folder: Path) -> Path:
    """vocab.json + merges.txt in CLIP's format, derived from the merges open_clip ships.

    Vocabulary order (49,408 ids): 256 byte symbols, the same with the end-of-word marker `</w>`, the
    48,894 merge results, then <|startoftext|> and <|endoftext|>.
    """
    import importlib.util

    # The vocabulary file inside the open_clip package, found without importing it (and its torchvision).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed: its CLIP vocabulary file is needed")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_VOCAB - 256 * 2 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB:
        raise RuntimeError(f"open_clip's BPE merges give {len(vocab)} tokens, not CLIP's {CLIP_VOCAB}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer with CLIP's real vocabulary, built offline (the weights are what is tiny)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_bpe_files(Path(tmp))
        # Through from_pretrained: the constructor ignores vocab_file/merges_file keyword arguments.
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_CONTEXT, pad_token=pad_token)


def tiny_text_encoder_config(hidden: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                          projection_dim=hidden, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=CLIP_CONTEXT, hidden_act="gelu",
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """A Stable Diffusion folder in the diffusers layout with tiny random weights; returns `path`.

    UNet: 2 blocks (32, 64 channels), cross-attention width 32, sample size 8. VAE: 2 blocks, so latents
    are half the image size, 4 latent channels. Text encoder: CLIP, width 32, 2 layers, 77 positions,
    CLIP's vocabulary. Scheduler: SD's (scaled_linear 0.00085..0.012, 1000 steps, epsilon).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(tiny_text_encoder_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    build_clip_tokenizer().save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def build_random_sd(arch_dir: Path, out: Path, seed: int = 0, device: str = "cpu") -> Path:
    """A diffusers folder with SD's real-size architecture (unet.json, vae.json, text.json, scheduler.json
    in `arch_dir`, e.g. examples/sd21-base-architecture) and random weights; for speed only.

    On CUDA the weights are initialised on the GPU (seconds instead of a minute) and saved in fp16, the
    precision the preset loads them in; on a CPU, fp32."""
    import sys

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch_dir, out = Path(arch_dir), Path(out)

    def load(name: str) -> dict:
        return {k: v for k, v in json.loads((arch_dir / name).read_text()).items() if not k.startswith("_")}

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    for name, make in (("unet", lambda: UNet2DConditionModel(**load("unet.json"))),
                       ("vae", lambda: AutoencoderKL(**load("vae.json"))),
                       ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**load("text.json"))))):
        try:
            with torch.device(device):
                model = make()
        except (RuntimeError, TypeError, ValueError) as e:  # built on the CPU instead: slower, same result
            print(f"building the {name} on {device} failed ({type(e).__name__}: {e}); building it on the CPU",
                  file=sys.stderr)
            model = make()
        model.to(dtype).save_pretrained(out / name)
        del model
    build_clip_tokenizer().save_pretrained(out / "tokenizer")
    sched = load("scheduler.json")
    DDPMScheduler(**{k: sched[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps",
                                            "prediction_type", "steps_offset", "clip_sample")}).save_pretrained(
        out / "scheduler")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def build_tiny_taesd(path: Path, seed: int = 0) -> Path:
    """An AutoencoderTiny folder (TAESD's architecture, diffusers layout as on the hub: config.json and
    weights at the top) with tiny random weights; returns `path`.

    Encoder: 2 blocks of width 8, so latents are half the image size, like build_tiny_sd's VAE; 4 latent
    channels; scaling factor 1, as TAESD's latents come scaled for the UNet.
    """
    from diffusers import AutoencoderTiny

    path = Path(path)
    torch.manual_seed(seed)
    AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
                    decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                    latent_channels=4, scaling_factor=1.0).save_pretrained(path)
    return path


def build_random_taesd(out: Path, seed: int = 0) -> Path:
    """An AutoencoderTiny folder with TAESD's real architecture (diffusers' defaults: 4 encoder blocks of
    width 64, 1/3/3/3 layers, 4 latent channels, scaling factor 1) and random weights; for speed only."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny().save_pretrained(out)
    return Path(out)


def benchmark_sd(model: str | None, folder: Path, tiny: bool, arch: Path, device: str = "cpu") -> str:
    """The Stable Diffusion a benchmark scores with: `model` when given, else one built in `folder`, tiny
    (a CPU smoke run) or with SD-2.1-base's real architecture (`arch`) and random weights (speed and memory
    do not depend on weight values)."""
    if model is not None:
        return model
    if tiny:
        return str(build_tiny_sd(Path(folder) / "sd"))
    return str(build_random_sd(Path(arch), Path(folder) / "sd", device=device))


def write_random_mvdream(path: str | Path, keys_file: str | Path, config: str | Path | None = None,
                         dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """An MVDream checkpoint at `path` (.pt) in the official layout: random tensors for the keys and shapes of
    `keys_file` (gzip text, `key<TAB>shape` lines), norm scales 1 + noise, the real DDPM betas (the loader
    checks them), small noise elsewhere; `config` (a .yaml in the reference's format) is copied beside it
    for a size other than SD 2.1-base's."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    with gzip.open(keys_file, "rt") as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            dims = [int(x) for x in shape.split("x")] if shape else []
            t = 0.05 * torch.randn(dims, generator=g)
            if key.endswith(".weight") and len(dims) == 1:  # GroupNorm / LayerNorm scales
                t += 1.0
            state[key] = t.to(dtype)
    state["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64).pow(2).float()
    torch.save(state, path)
    if config is not None:
        shutil.copy(config, path.with_suffix(".yaml"))
    return path


def build_random_mvdream(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                         tiny: bool = False) -> Path:
    """MVDream's UNet, VAE and text encoder with their own random initialisation, built on `device` and saved
    to `folder` (unet/, vae/, text_encoder/) in `dtype`: SD 2.1-base's real sizes, or tiny ones."""
    from threed.guidance.mvdream_checkpoint import SD21_PARAMS, SD21_TEXT, build_modules

    params, text = SD21_PARAMS, SD21_TEXT
    if tiny:
        params = {**SD21_PARAMS, "unet_config": {"params": {
            **SD21_PARAMS["unet_config"]["params"], "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "context_dim": 64}},
            "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
                **SD21_PARAMS["first_stage_config"]["params"]["ddconfig"], "ch": 32, "ch_mult": [1, 2],
                "num_res_blocks": 1}}}}
        text = {**SD21_TEXT, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1,
                "num_attention_heads": 1, "projection_dim": 64}
    torch.manual_seed(0)
    folder = Path(folder)
    for name, module in zip(("unet", "vae", "text_encoder"), build_modules(params, text, device)):
        module.to(dtype).save_pretrained(folder / name)
    return folder
def tiny_zero123_ldm_config() -> dict:
    """A latent-diffusion config of Zero123's shape, tiny: UNet levels of 32 and 64 channels (cross-attention
    on the first), one residual block each, a 2-level VAE (latents at half the image size), context width 32."""
    return {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": {
            "image_size": 8, "in_channels": 8, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 32, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
    }}}


def build_zero123(path: Path, ldm_config: dict | None = None, seed: int = 0, projection: str = "cc_projection",
                  device: str = "cpu") -> Path:
    """A Zero123 folder in the diffusers layout with random weights, its networks shaped by `ldm_config` (a
    latent-diffusion config; default: tiny_zero123_ldm_config) through diffusers' own LDM -> diffusers config
    conversion, as a checkpoint of that config loads (threed/guidance/zero123_model.py). The CLIP image encoder
    is tiny (width 32) unless the context is 768 wide (then ViT-L/14's shape). `projection`: cc_projection
    (CCProjection, key `projection`) or clip_camera_projection (CLIPCameraProjection, key `proj`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (create_unet_diffusers_config,
                                                                        create_vae_diffusers_config)
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    ldm = ldm_config or tiny_zero123_ldm_config()
    params = ldm["model"]["params"]
    image_size = 8 * int(params["unet_config"]["params"].get("image_size", 32))
    context = int(params["unet_config"]["params"]["context_dim"])
    path = Path(path)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    unet_config = create_unet_diffusers_config(ldm, image_size=image_size)
    unet_config["upcast_attention"] = False
    vae_config = create_vae_diffusers_config(ldm, image_size=image_size)
    vae_config["scaling_factor"] = float(params.get("scale_factor", 0.18215))
    if context == 768:  # OpenAI's ViT-L/14
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu")
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=context, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=224, patch_size=32)
    with torch.device(device):
        for name, make in (("unet", lambda: UNet2DConditionModel(**unet_config)),
                           ("vae", lambda: AutoencoderKL(**vae_config)),
                           ("image_encoder", lambda: CLIPVisionModelWithProjection(vision))):
            make().to(dtype).save_pretrained(path / name)
        layer = torch.nn.Linear(context + 4, context)
    key = "projection" if projection == "cc_projection" else "proj"
    (path / projection).mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.weight": layer.weight.detach().to("cpu", dtype).contiguous(),
               f"{key}.bias": layer.bias.detach().to("cpu", dtype).contiguous()},
              str(path / projection / "diffusion_pytorch_model.safetensors"))
    (path / projection / "config.json").write_text(json.dumps(
        {"_class_name": "CCProjection" if key == "projection" else "CLIPCameraProjection"}))
    DDIMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)), beta_start=float(params["linear_start"]),
                  beta_end=float(params["linear_end"]), beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "Zero1to3StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "DDIMScheduler"], projection: ["pipeline_zero1to3", "CCProjection"]}, indent=2))
    return path
