"""Typed, strict configuration: dataclasses filled from a YAML preset plus `key=value` overrides.

A typo is an error, not a silently ignored key: unknown keys and badly typed values raise a
`UserError` naming the key and the nearest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Literal

import yaml

from threed.errors import UserError, first_line

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class FieldConfig:
    """Hash-grid NeRF: density + albedo (see threed/fields/)."""

    backend: Literal["auto", "torch", "triton", "tcnn"] = "auto"  # auto: tcnn, else triton on CUDA, else torch
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    density_activation: Literal["trunc_exp", "softplus"] = "softplus"
    density_blob_scale: float = 10.0  # Magic3D blob: raw density += scale * (1 - |x| / std)
    density_blob_std: float = 0.5
    normals: Literal["finite_difference", "analytic"] = "finite_difference"
    finite_difference_eps: float = 0.01


@dataclass
class RenderConfig:
    """Volume rendering, shading and background (see threed/render/)."""

    backend: Literal["auto", "torch", "nerfacc"] = "auto"
    width: int = 64
    height: int = 64
    batch_size: int = 1
    num_samples: int = 64  # samples per ray across the bounding box (nerfacc: step = diagonal / this)
    bound: float = 1.0  # the scene is the cube [-bound, bound]^3
    occupancy_resolution: int = 64
    occupancy_update_every: int = 16
    occupancy_threshold: float = 0.01
    shading: Literal["random", "albedo", "lambertian", "textureless"] = "random"
    albedo_only_steps: int = 1000  # DreamFusion: albedo only while the coarse shape forms
    textureless_prob: float = 0.5
    ambient: float = 0.1
    light_distance: tuple[float, float] = (0.8, 1.5)  # as a multiple of the camera distance
    background: Literal["mlp", "solid", "random"] = "mlp"
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    chunk_rays: int = 16384


@dataclass
class CameraConfig:
    """Random spherical cameras looking at the origin (degrees, scene units)."""

    distance: tuple[float, float] = (1.5, 2.0)
    fovy: tuple[float, float] = (40.0, 70.0)
    elevation: tuple[float, float] = (-10.0, 45.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    eval_distance: float = 1.75
    eval_fovy: float = 55.0
    eval_elevation: float = 15.0
    front_threshold: float = 45.0  # half-angle of the azimuth range called "front"
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0


@dataclass
class GuidanceConfig:
    """Score distillation (SD or oracle prior) and CLIP guidance settings."""

    type: Literal["stable_diffusion", "oracle", "clip"] = "stable_diffusion"
    model: str = "stabilityai/stable-diffusion-2-1-base"
    half_precision: bool = True  # fp16 weights on CUDA; always fp32 on CPU
    guidance_scale: float = 100.0
    t_range: tuple[float, float] = (0.02, 0.98)
    t_max_end: float = -1.0  # anneal the upper end of t_range to this by t_anneal_steps (<0: off)
    t_anneal_steps: int = 0
    weighting: Literal["sds", "uniform", "snr"] = "sds"  # sds: w(t) = 1 - alpha_bar_t
    resolution: int = 512  # image size fed to the VAE encoder
    view_dependent_prompting: bool = True
    grad_clip: float = -1.0  # clip |w(t)(eps_hat - eps)| elementwise (<0: off)
    # oracle prior (threed/guidance/oracle.py)
    reference: str = ""
    oracle_views: int = 4  # K: reference views in the posterior (1 = the exact view only)
    oracle_jitter: float = 3.0  # degrees of azimuth/elevation jitter for views 2..K
    oracle_color: tuple[float, float, float] = (0.8, 0.8, 0.8)  # reference albedo if it has none
    # CLIP guidance (threed/guidance/clip.py)
    clip_models: tuple[str, ...] = ("ViT-B-32",)
    clip_pretrained: tuple[str, ...] = ("openai",)
    clip_resolution: int = 224
    clip_num_augs: int = 4


@dataclass
class OptimConfig:
    lr: float = 0.01
    lr_background: float = 0.001
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.0


@dataclass
class LossConfig:
    """Weights of the named losses; the total is their weighted sum."""

    guidance: float = 1.0
    opacity: float = 0.0  # mean rendered opacity: removes floaters the guidance cannot see
    transmittance: float = 0.0  # Dream Fields: -min(target, mean transmittance), target annealed
    transmittance_target: tuple[float, float] = (0.5, 0.88)  # (start, end)
    transmittance_anneal_steps: int = 500
    orient: float = 0.0  # DreamFusion normal orientation penalty
    entropy: float = 0.0  # binary entropy of opacity: pushes it to 0 or 1


@dataclass
class ExportConfig:
    resolution: int = 256  # marching-cubes grid per axis
    threshold: float = -1.0  # density level; < 0 picks it automatically (silhouette agreement)
    keep_components: float = 0.05  # drop connected parts smaller than this fraction of the largest
    decimate_faces: int = 0  # target face count (0: off)
    formats: tuple[str, ...] = ("obj", "glb")
    video: bool = True
    video_frames: int = 48
    video_resolution: int = 256
    video_fps: int = 24
    preview_views: int = 8


@dataclass
class Config:
    method: str = "dreamfusion"
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 10000
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    field: FieldConfig = _field(default_factory=FieldConfig)
    render: RenderConfig = _field(default_factory=RenderConfig)
    camera: CameraConfig = _field(default_factory=CameraConfig)
    guidance: GuidanceConfig = _field(default_factory=GuidanceConfig)
    optim: OptimConfig = _field(default_factory=OptimConfig)
    loss: LossConfig = _field(default_factory=LossConfig)
    export: ExportConfig = _field(default_factory=ExportConfig)


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    shown = close or options[:8]
    return ", ".join(shown)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats and lists to tuples."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"bad value {value!r} for '{key}': choose one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and len(args) == 2 and args[1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"bad value {value!r} for '{key}': expected a list like [a, b]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise UserError(f"bad value {value!r} for '{key}': expected {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"bad value {value!r} for '{key}': expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"bad value {value!r} for '{key}': expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"bad value {value!r} for '{key}': expected a number")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"bad value {value!r} for '{key}': expected a string")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from the nested dict `data`, strictly."""
    if not isinstance(data, dict):
        raise UserError(f"bad value for '{prefix.rstrip('.') or 'config'}': expected a mapping")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            options = [f"{prefix}{n}" for n in names]
            raise UserError(f"unknown config key '{full}'; did you mean: {_nearest(full, options)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, for error messages and docs."""
    obj = obj if obj is not None else Config()
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_override(text: str) -> dict:
    """`a.b=value` -> {"a": {"b": value}} with the value parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise UserError(f"bad override '{text}': write key=value, e.g. render.width=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"bad override '{text}': the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if key not in all_keys():
        raise UserError(f"unknown config key '{key}'; did you mean: {_nearest(key, all_keys())}")
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def preset_path(name: str) -> Path:
    """A preset name (`dreamfusion-sd`) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"unknown preset '{name}'; choose one of {', '.join(presets)} or pass a .yaml file")


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return data


def build_config(preset: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults <- preset YAML (or `base`, a saved config) <- `key=value` overrides."""
    cfg = Config()
    if base is not None:
        _apply(cfg, base)
    elif preset is not None:
        _apply(cfg, load_yaml(preset_path(str(preset))))
    for text in overrides or []:
        _apply(cfg, parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.steps >= 0, "steps", "must be >= 0"),
        (cfg.render.width > 0 and cfg.render.height > 0, "render.width/height", "must be positive"),
        (cfg.render.num_samples >= 2, "render.num_samples", "must be >= 2"),
        (cfg.render.bound > 0, "render.bound", "must be positive"),
        (cfg.render.batch_size >= 1, "render.batch_size", "must be >= 1"),
        (0.0 <= cfg.render.textureless_prob <= 1.0, "render.textureless_prob", "must be in [0, 1]"),
        (0.0 < cfg.guidance.t_range[0] <= cfg.guidance.t_range[1] < 1.0, "guidance.t_range", "must satisfy 0 < t_min <= t_max < 1"),
        (cfg.guidance.oracle_views >= 1, "guidance.oracle_views", "must be >= 1"),
        (cfg.field.n_levels >= 1, "field.n_levels", "must be >= 1"),
        (cfg.field.max_resolution >= cfg.field.base_resolution, "field.max_resolution", "must be >= field.base_resolution"),
        (cfg.optim.lr > 0, "optim.lr", "must be positive"),
        (cfg.export.resolution >= 8, "export.resolution", "must be >= 8"),
        (cfg.export.video_resolution % 16 == 0, "export.video_resolution", "must be a multiple of 16 (video codecs)"),
        (len(cfg.guidance.clip_models) == len(cfg.guidance.clip_pretrained), "guidance.clip_pretrained",
         "needs one entry per guidance.clip_models entry"),
    ]
    for fmt in cfg.export.formats:
        checks.append((fmt in ("obj", "glb", "ply"), "export.formats", f"has '{fmt}'; use obj, glb or ply"))
    for ok, key, why in checks:
        if not ok:
            raise UserError(f"bad value for '{key}': {why}")


def to_dict(cfg: Config) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: Path) -> None:
    from threed.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_device(name: str) -> str:
    import torch

    if name in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return name
    if name != "cpu":
        raise UserError(f"unknown device '{name}'; use cpu or cuda")
    return name


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
