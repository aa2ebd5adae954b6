"""Typed, strict configuration: dataclasses filled from a YAML preset plus `key=value` overrides.

A typo is an error, not a silently ignored key: unknown keys and badly typed values raise a
`UserError` naming the key and the nearest valid ones. The `guidance:` section takes its priors, their
settings sections and the values of `guidance.type` from the prior registry (threed/priors.py); how a
prior is built is the registry's business too, so this module imports no guidance module.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field as _field
from pathlib import Path
from typing import Any, Literal

import yaml

from threed import priors
from threed.errors import UserError, first_line
from threed.image_config import ImageConfig
# The prior sections' settings live with the registry; they are importable from here as before.
from threed.priors import (DEFAULT_SD_MODEL, DEFAULT_TINY_VAE_MODEL, ClipConfig, CompileMode,  # noqa: F401
                           OracleConfig, SDConfig, VSDConfig)
# The mesh stages' sections live in their own module; importable from here as before.
from threed.gaussian_settings import GaussianConfig, gaussian_checks
from threed.mesh_config import (AppearanceConfig, GeometryConfig, MeshConfig, MeshLossConfig,  # noqa: F401
                                SDFInitConfig)
from threed.schedule import Schedule, progressive_checks
# The sections of the field, renderer, cameras, optimiser, losses and export live in threed/sections.py;
# they are importable from here as before.
from threed.sections import (CameraConfig, ExportConfig, FieldConfig, LossConfig, OptimConfig,  # noqa: F401
                             RenderConfig, same_as_lr)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# What `guidance.type` accepts: the registry's priors (threed/priors.py).
PriorName = Literal[tuple(priors.PRIORS)]  # type: ignore[valid-type]


@dataclass
class _GuidanceSettings:
    """The prior (`type`) and the score-distillation settings shared by the diffusion-style priors
    (stable_diffusion, oracle); GuidanceConfig adds each prior's own section under guidance.<section>."""

    type: PriorName = priors.default_prior()
    t_min: Schedule = Schedule.constant(0.02)  # t ~ U[t_min, t_max] (fractions of the diffusion's T)
    t_max: Schedule = Schedule.constant(0.98)
    weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"  # w(t), threestudio's names (guidance/sds.py)
    grad_clip: float = -1.0  # clip |w(t)(eps_hat - eps)| elementwise (<0: off)
    view_dependent_prompting: bool = True  # "..., side view" etc. (stable_diffusion, clip)

    @property
    def prior(self) -> Any:
        """The settings section of the chosen prior (guidance.sd for stable_diffusion, ...)."""
        return getattr(self, PRIOR_SECTIONS[self.type])


# The shared settings, then one section per prior and per method-owned section (guidance.sd, guidance.oracle,
# guidance.clip, guidance.vsd), in the registry's order: a prior is added to threed/priors.py, not here.
GuidanceConfig = dataclasses.make_dataclass(
    "GuidanceConfig", [(name, cls, _field(default_factory=cls)) for name, cls in priors.sections().items()],
    bases=(_GuidanceSettings,), namespace={"__module__": __name__, "__doc__": (
        "The prior (`type`), the score-distillation settings its diffusion-style priors share, and one section "
        "per prior and per method-owned section (guidance.sd, ...), from the registry (threed/priors.py).")})

# The section of each prior under `guidance.`; a section's keys only apply when its prior is used.
PRIOR_SECTIONS = {p.name: p.section for p in priors.PRIORS.values()}
# Sections under `guidance.` that only one method uses (threed.methods.Method.sections), and that method.
METHOD_SECTIONS = {s.section: s.method for s in priors.METHOD_SECTIONS.values()}


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
    mesh: MeshConfig = _field(default_factory=MeshConfig)
    geometry: GeometryConfig = _field(default_factory=GeometryConfig)
    texture: MeshConfig = _field(default_factory=MeshConfig)
    appearance: AppearanceConfig = _field(default_factory=AppearanceConfig)
    image: ImageConfig = _field(default_factory=ImageConfig)
    gaussians: GaussianConfig = _field(default_factory=GaussianConfig)


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    shown = close or options[:8]
    return ", ".join(shown)


def is_section(value: Any) -> bool:
    """A nested config group (a dataclass other than a Schedule, which is a leaf value)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, Schedule)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats and lists to tuples."""
    if tp is Schedule:
        return Schedule.parse(value, key)
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


# Keys renamed when each prior got its own section and scalars became schedules (threed 0.2).
RENAMED = {
    "guidance.model": "guidance.sd.model",
    "guidance.half_precision": "guidance.sd.half_precision",
    "guidance.guidance_scale": "guidance.sd.guidance_scale",
    "guidance.resolution": "guidance.sd.resolution",
    "guidance.t_range": "guidance.t_min and guidance.t_max",
    "guidance.t_max_end": "guidance.t_max (a schedule: [0, t_max, t_max_end, t_anneal_steps])",
    "guidance.t_anneal_steps": "guidance.t_max (a schedule: [0, t_max, t_max_end, t_anneal_steps])",
    "guidance.reference": "guidance.oracle.reference",
    "guidance.oracle_views": "guidance.oracle.views",
    "guidance.oracle_jitter": "guidance.oracle.jitter",
    "guidance.oracle_color": "guidance.oracle.color",
    "guidance.clip_models": "guidance.clip.models",
    "guidance.clip_pretrained": "guidance.clip.pretrained",
    "guidance.clip_resolution": "guidance.clip.resolution",
    "guidance.clip_num_augs": "guidance.clip.num_augs",
    "loss.transmittance_anneal_steps": "loss.transmittance_target (a schedule: [0, start, end, steps])",
}


def _unknown_key(full: str, prefix: str, names: list[str]) -> UserError:
    if full in RENAMED:
        return UserError(f"config key '{full}' was renamed: use {RENAMED[full]} (README: renamed keys)")
    section = prefix.rstrip(".")
    options = [f"{prefix}{n}" for n in names]
    if section.startswith("guidance.") and section.count(".") == 1:
        prior = section.split(".")[1]
        if prior in METHOD_SECTIONS:
            return UserError(f"unknown config key '{full}' of the {METHOD_SECTIONS[prior]} method; its keys are: "
                             f"{', '.join(options)}")
        return UserError(f"unknown config key '{full}' for the {prior} prior; its keys are: {', '.join(options)}")
    return UserError(f"unknown config key '{full}'; did you mean: {_nearest(full, options)}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from the nested dict `data`, strictly."""
    if not isinstance(data, dict):
        raise UserError(f"bad value for '{prefix.rstrip('.') or 'config'}': expected a mapping")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full, prefix, names)
        current = getattr(obj, key)
        if is_section(current):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config, for error messages and docs."""
    obj = obj if obj is not None else Config()
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_section(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unflat(flat: dict[str, Any]) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


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
        if key in RENAMED:
            raise _unknown_key(key, "", [])
        raise UserError(f"unknown config key '{key}'; did you mean: {_nearest(key, all_keys())}")
    return _unflat({key: value})


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
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config data keyed by dotted keys."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def migrate(data: dict) -> dict:
    """A config saved by threed 0.1 (flat guidance keys, scalar annealers) in today's layout, so older
    run directories can still be resumed and exported. Today's configs pass through unchanged."""
    flat = flatten(data)
    if not any(key in RENAMED for key in flat):
        return data
    moved = {"guidance.model", "guidance.half_precision", "guidance.guidance_scale", "guidance.resolution",
             "guidance.reference", "guidance.oracle_views", "guidance.oracle_jitter", "guidance.oracle_color",
             "guidance.clip_models", "guidance.clip_pretrained", "guidance.clip_resolution",
             "guidance.clip_num_augs"}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in moved:
            out[RENAMED[key]] = value
        elif key not in RENAMED:
            out[key] = value
    if "guidance.t_range" in flat:
        t_min, t_max = flat["guidance.t_range"]
        out["guidance.t_min"] = t_min
        out["guidance.t_max"] = t_max
        end, steps = flat.get("guidance.t_max_end", -1.0), flat.get("guidance.t_anneal_steps", 0)
        if end >= 0 and steps > 0:
            out["guidance.t_max"] = [0, t_max, end, steps]
    if isinstance(flat.get("loss.transmittance_target"), list):
        start, end = flat["loss.transmittance_target"]
        out["loss.transmittance_target"] = [0, start, end, max(int(flat.get("loss.transmittance_anneal_steps", 500)), 1)]
    return _unflat(out)


def build_config(preset: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults <- preset YAML (or `base`, a saved config) <- `key=value` overrides."""
    cfg = Config()
    if base is not None:
        _apply(cfg, migrate(base))
    elif preset is not None:
        _apply(cfg, load_yaml(preset_path(str(preset))))
    for text in overrides or []:
        _apply(cfg, parse_override(text))
    validate(cfg)
    return cfg


def section_values(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _changed_keys(cfg: Config, section: str) -> str:
    current = section_values(getattr(cfg.guidance, section))
    default = section_values(type(getattr(cfg.guidance, section))())
    return ", ".join(f"guidance.{section}.{k}" for k in current if current[k] != default[k])


def check_prior_sections(cfg: Config, active: set[str]) -> None:
    """A section under `guidance.` that the run does not use (`active`: its prior's and its method's) must
    hold its defaults: a setting there would be silently ignored (e.g. guidance.clip.models on a Stable
    Diffusion run, guidance.vsd.lora_rank on a DreamFusion run)."""
    for prior, section in PRIOR_SECTIONS.items():
        keys = "" if section in active else _changed_keys(cfg, section)
        if keys:
            raise UserError(f"{keys} set, but this run's prior is {cfg.guidance.type}, not {prior}: "
                            f"drop the setting or pass --guidance {prior}")
    for section, method in METHOD_SECTIONS.items():
        keys = "" if section in active else _changed_keys(cfg, section)
        if keys:
            raise UserError(f"{keys} set, but this run's method is {cfg.method}, not {method}: "
                            f"drop the setting or pass --method {method}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    g = cfg.guidance
    t_lo, t_hi = min(g.t_min.bounds()[0], g.t_max.bounds()[0]), max(g.t_min.bounds()[1], g.t_max.bounds()[1])
    checks = [
        (cfg.steps >= 0, "steps", "must be >= 0"),
        (cfg.render.width > 0 and cfg.render.height > 0, "render.width/height", "must be positive"),
        (cfg.render.num_samples >= 2, "render.num_samples", "must be >= 2"),
        (cfg.render.bound > 0, "render.bound", "must be positive"),
        (cfg.render.batch_size >= 1, "render.batch_size", "must be >= 1"),
        (cfg.render.hires_width > 0 and cfg.render.hires_height > 0, "render.hires_width/height", "must be positive"),
        (cfg.render.checkpoint_rays >= 0, "render.checkpoint_rays", "must be >= 0 (0: never)"),
        (0.0 <= cfg.render.textureless_prob <= 1.0, "render.textureless_prob", "must be in [0, 1]"),
        (0.0 <= cfg.render.random_aug <= 1.0, "render.random_aug", "must be a probability in [0, 1]"),
        (0.0 <= cfg.render.albedo_prob <= 1.0, "render.albedo_prob", "must be in [0, 1]"),
        (cfg.render.light_jitter >= 0, "render.light_jitter", "must be >= 0"),
        (0 < cfg.render.light_distance[0] <= cfg.render.light_distance[1], "render.light_distance",
         "must be [near, far] with 0 < near <= far"),
        (0.0 < t_lo and t_hi < 1.0, "guidance.t_min/t_max", "must stay inside (0, 1)"),
        (g.t_min.start <= g.t_max.start and g.t_min.end <= g.t_max.end, "guidance.t_min",
         "must not exceed guidance.t_max"),
        (g.oracle.views >= 1, "guidance.oracle.views", "must be >= 1"),
        (0.0 <= cfg.camera.elevation_sphere_prob <= 1.0, "camera.elevation_sphere_prob", "must be in [0, 1]"),
        (cfg.camera.views >= 1 and 0 == cfg.render.batch_size % cfg.camera.views == cfg.render.hires_batch_size
         % cfg.camera.views, "camera.views", "must be >= 1 and divide render.batch_size and hires_batch_size"),
        (min(cfg.camera.position_jitter, cfg.camera.center_jitter, cfg.camera.up_jitter) >= 0,
         "camera.position_jitter/center_jitter/up_jitter", "must be >= 0 (0: off)"),
        (not (g.sd.perp_neg and not g.view_dependent_prompting), "guidance.sd.perp_neg",
         "mixes the view prompts: it needs guidance.view_dependent_prompting=true"),
        (cfg.field.n_levels >= 1, "field.n_levels", "must be >= 1"),
        (not cfg.field.progressive_levels or (len(cfg.field.progressive_levels) == 3
                                              and 1 <= cfg.field.progressive_levels[0] <= cfg.field.n_levels
                                              and cfg.field.progressive_levels[1] >= 0
                                              and cfg.field.progressive_levels[2] >= 1),
         "field.progressive_levels", "needs [start_level (1..field.n_levels), start_step >= 0, update_steps >= 1] or []"),
        (cfg.field.max_resolution >= cfg.field.base_resolution, "field.max_resolution", "must be >= field.base_resolution"),
        (cfg.optim.lr.bounds()[0] > 0, "optim.lr", "must be positive"),
        (same_as_lr(cfg.optim.lr_mlp) or cfg.optim.lr_mlp.bounds()[0] > 0, "optim.lr_mlp",
         "must be positive throughout (or < 0: optim.lr)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (cfg.export.resolution >= 8, "export.resolution", "must be >= 8"),
        (cfg.export.video_resolution % 16 == 0, "export.video_resolution", "must be a multiple of 16 (video codecs)"),
        (16 <= cfg.export.texture_size <= 16384, "export.texture_size", "must be in [16, 16384]"),
        (cfg.export.texture_max_faces >= 4, "export.texture_max_faces", "must be >= 4"),
        (len(g.clip.models) == len(g.clip.pretrained), "guidance.clip.pretrained",
         "needs one entry per guidance.clip.models entry"),
        (0.0 < g.clip.crop_scale[0] <= g.clip.crop_scale[1] <= 1.0, "guidance.clip.crop_scale",
         "must be [lo, hi] with 0 < lo <= hi <= 1 (fractions of the render's side)"),
        (g.vsd.lora_rank >= 1, "guidance.vsd.lora_rank", "must be >= 1"),
        (g.vsd.lora_samples >= 1, "guidance.vsd.lora_samples", "must be >= 1"),
        (g.vsd.lora_lr.bounds()[0] > 0, "guidance.vsd.lora_lr", "must be positive"),
        (g.vsd.lora_eps > 0, "guidance.vsd.lora_eps", "must be positive"),
        (0.0 <= g.vsd.lora_t[0] < g.vsd.lora_t[1] <= 1.0, "guidance.vsd.lora_t", "must be [lo, hi] with 0 <= lo < hi <= 1"),
        (0.0 <= g.vsd.camera_dropout <= 1.0, "guidance.vsd.camera_dropout", "must be in [0, 1]"),
        (len(g.vsd.denoiser_channels) >= 1 and min(g.vsd.denoiser_channels) >= 8
         and all(c % 8 == 0 for c in g.vsd.denoiser_channels), "guidance.vsd.denoiser_channels",
         "must be one or more multiples of 8"),
    ]
    checks += gaussian_checks(cfg.gaussians)
    for name in ("guidance", "opacity", "sparsity", "transmittance", "orient", "entropy", "normal_smooth",
                 "normal_smooth_3d"):
        checks.append((getattr(cfg.loss, name).bounds()[0] >= 0, f"loss.{name}", "must be >= 0"))
    # the oracle renders its reference with render.ambient: a random split would not match it
    checks.append((not (cfg.render.soft_shading and g.type == "oracle"
                        and cfg.render.shading in ("random", "lambertian", "textureless")),
                   "render.soft_shading", "cannot be used with the oracle prior, whose reference renders use "
                   "render.ambient"))
    checks += cfg.image.checks() + progressive_checks(cfg.render)
    for section in STAGE_SECTIONS:
        m = getattr(cfg, section)
        checks += _mesh_checks(m, section)
        lit = m.shading in ("random", "lambertian", "textureless")
        checks.append((not (m.soft_shading and g.type == "oracle" and lit),
                       f"{section}.soft_shading",
                       "cannot be used with the oracle prior, whose reference renders use render.ambient"))
    i = cfg.geometry.init
    checks += [
        (cfg.geometry.latent_steps >= 0, "geometry.latent_steps", "must be >= 0"),
        (0 < i.radius < cfg.render.bound, "geometry.init.radius", "must be in (0, render.bound)"),
        (0 < i.mesh_scale <= 1, "geometry.init.mesh_scale", "must be in (0, 1] (a fraction of render.bound)"),
        (i.mesh_up[1] != i.mesh_front[1], "geometry.init.mesh_front", "must be another axis than geometry.init.mesh_up"),
        (cfg.appearance.env_scale > 0, "appearance.env_scale", "must be positive"),
        (0 <= cfg.appearance.roughness[0] <= cfg.appearance.roughness[1] <= 1, "appearance.roughness",
         "must be [low, high] inside [0, 1]"),
        (0 <= cfg.appearance.metallic[0] <= cfg.appearance.metallic[1] <= 1, "appearance.metallic",
         "must be [low, high] inside [0, 1]"),
    ]
    checks.append((cfg.texture.deform_scale == cfg.geometry.deform_scale, "texture.deform_scale",
                   "must equal geometry.deform_scale (the texture stage keeps the geometry stage's surface)"))
    for fmt in cfg.export.formats:
        checks.append((fmt in ("obj", "glb", "ply"), "export.formats", f"has '{fmt}'; use obj, glb or ply"))
    for ok, key, why in checks:
        if not ok:
            raise UserError(f"bad value for '{key}': {why}")


def to_dict(obj: Any) -> dict:
    """A config (or section) as plain YAML-able data; schedules in their preset form."""

    def plain(v: Any) -> Any:
        if isinstance(v, Schedule):
            return v.to_plain()
        if is_section(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


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


# The sections of a mesh-shaped stage (MeshConfig), each read by the stage of that name (threed/stages.py).
STAGE_SECTIONS = ("mesh", "geometry", "texture", "appearance")


def _mesh_checks(m: MeshConfig, prefix: str) -> list[tuple[bool, str, str]]:
    """Range checks of one mesh stage's section."""
    lo, hi = min(m.t_min.bounds()[0], m.t_max.bounds()[0]), max(m.t_min.bounds()[1], m.t_max.bounds()[1])
    checks = [
        (m.steps >= 0, f"{prefix}.steps", "must be >= 0"),
        (m.resolution >= 4, f"{prefix}.resolution", "must be >= 4"),
        (m.deform_scale >= 0, f"{prefix}.deform_scale", "must be >= 0"),
        (m.start_smoothing >= 0, f"{prefix}.start_smoothing", "must be >= 0 (cells; 0: off)"),
        (m.width > 0 and m.height > 0, f"{prefix}.width/height", "must be positive"),
        (m.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1"),
        (m.views >= 1 and m.batch_size % m.views == 0, f"{prefix}.views", f"must be >= 1 and divide {prefix}.batch_size"),
        (0.0 <= m.textureless_prob <= 1.0, f"{prefix}.textureless_prob", "must be in [0, 1]"),
        (0.0 <= m.random_aug <= 1.0, f"{prefix}.random_aug", "must be a probability in [0, 1]"),
        (0.0 <= m.albedo_prob <= 1.0, f"{prefix}.albedo_prob", "must be in [0, 1]"),
        (0.0 < lo and hi < 1.0, f"{prefix}.t_min/t_max", "must stay inside (0, 1)"),
        (m.t_min.start <= m.t_max.start and m.t_min.end <= m.t_max.end, f"{prefix}.t_min",
         f"must not exceed {prefix}.t_max"),
        (0 < m.distance[0] <= m.distance[1], f"{prefix}.distance", "must be [near, far] with 0 < near <= far"),
        (0 < m.fovy[0] <= m.fovy[1] < 180, f"{prefix}.fovy", "must be [low, high] degrees inside (0, 180)"),
        (m.elevation[0] <= m.elevation[1], f"{prefix}.elevation", "must be [low, high]"),
    ]
    for name in ("lr_sdf", "lr_deformation", "lr_texture", "lr_background"):
        checks.append((getattr(m, name).bounds()[0] >= 0, f"{prefix}.{name}", "must be >= 0"))
    checks.append((same_as_lr(m.lr_texture_mlp) or m.lr_texture_mlp.bounds()[0] >= 0, f"{prefix}.lr_texture_mlp",
                   f"must be >= 0 throughout (or < 0: {prefix}.lr_texture)"))
    for name in ("guidance", "normal_consistency", "laplacian", "sign_flip"):
        checks.append((getattr(m.loss, name).bounds()[0] >= 0, f"{prefix}.loss.{name}", "must be >= 0"))
    return checks
