"""The run specification: how command-line options become a run's Config, in one place.

`threed run`, `threed run --resume` and `threed bench` all go through `resolve` / `resume_config`:
the method comes from --method, else the preset's `method:` key, else the prior; the preset from
--preset, else the method's (its CPU preset where no CUDA GPU is visible, saying so); options are
`key=value` overrides with friendly names, each concerning one prior, and the user's own overrides
come last. Nothing is dropped silently: an option or key that would not take effect is an error.
`threed run --method magic3d-refine --from RUN_DIR` goes through `resolve_refine`: the config of RUN_DIR
with the `mesh:` section of the method's preset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from threed import methods, priors
from threed.config import (METHOD_SECTIONS, PRIOR_SECTIONS, STAGE_SECTIONS, Config, build_config,
                           check_prior_sections, flatten, load_yaml, preset_path, to_dict)
from threed.errors import UserError
from threed.rundir import RunDir, checkpoint_step

# Derived from the prior registry (threed/priors.py), as are the options concerning one prior below.
PRIOR_ALIASES = priors.aliases()
PRIORS = tuple(priors.PRIORS)


@dataclass
class _Options:
    """The options people change every run (None: not given). Everything else is `overrides`. RunOptions
    adds one attribute per option of a prior (model, reference, clip_model, ...: threed/priors.py)."""

    method: str | None = None
    preset: str | None = None
    guidance: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    device: str | None = None
    from_run: str | None = None  # magic3d-refine: the run whose NeRF is refined
    image: str | None = None  # image-to-3D: the input image (image.path)
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: Any) -> _Options:
        """From an argparse namespace (attributes it lacks are not given)."""
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
        values["overrides"] = list(values["overrides"] or [])
        return cls(**values)


RunOptions = dataclasses.make_dataclass(
    "RunOptions", [(name, str | None, None) for name in dict.fromkeys(o.name for _, o in priors.options())],
    bases=(_Options,),
    namespace={"__doc__": _Options.__doc__, "__module__": __name__})


class OptionSpec(NamedTuple):
    """What an option sets: its config key, the prior it concerns (None: every prior), whether it is a
    comma-separated list, and whether it names a file (stored as an absolute path)."""

    key: str
    prior: str | None
    is_list: bool = False
    path: bool = False


def _option_specs() -> dict[str, OptionSpec]:
    """The run's own options around the registry's options of one prior, in the order they are applied."""
    concerning: dict[str, OptionSpec] = {}
    for p, o in priors.options():  # an option of several priors: its first's (SHARED_KEYS has the others)
        concerning.setdefault(o.name, OptionSpec(p.key(o), p.name, o.is_list, o.path))
    return {"prompt": OptionSpec("prompt", None), "negative_prompt": OptionSpec("negative_prompt", None),
            "image": OptionSpec("image.path", None, path=True), **concerning,
            **{name: OptionSpec(name, None) for name in ("steps", "seed", "device")}}


# option -> what it sets; the options of one prior come from the registry
OPTIONS: dict[str, OptionSpec] = _option_specs()
# An option that several priors take (--model: stable_diffusion's and zero123's): prior -> the key it sets there.
# OPTIONS holds its first prior's.
SHARED_KEYS: dict[str, dict[str, str]] = {
    name: keys for name in OPTIONS
    if len(keys := {p.name: p.key(o) for p, o in priors.options() if o.name == name}) > 1}


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def canonical_prior(name: str) -> str:
    prior = PRIOR_ALIASES.get(name, name)
    if prior not in PRIORS:
        also = f" (or {', '.join(PRIOR_ALIASES)})" if PRIOR_ALIASES else ""
        raise UserError(f"unknown prior '{name}' for --guidance: choose one of {', '.join(PRIORS)}{also}")
    return prior


def _quoted(value: str) -> str:
    """A YAML single-quoted string, whatever it holds."""
    return "'" + value.replace("'", "''") + "'"


def given(opts: RunOptions) -> list[str]:
    """The names of the options that were given."""
    return [name for name in OPTIONS if getattr(opts, name) is not None]


def option_overrides(opts: RunOptions, prior: str, only_concerning: bool = False) -> list[str]:
    """`key=value` for each option given. An option for another prior than `prior` is an error, or, with
    `only_concerning` (the bench applies model options to the methods they concern), skipped."""
    out = []
    for name in given(opts):
        key, concerns, is_list, is_path = OPTIONS[name]
        if prior in SHARED_KEYS.get(name, {}):
            key, concerns = SHARED_KEYS[name][prior], prior
        if concerns is not None and concerns != prior:
            if only_concerning:
                continue
            raise UserError(f"{flag(name)} applies to the {concerns} prior, but this run's prior is {prior}: "
                            f"drop it or pass --guidance {concerns}")
        value = getattr(opts, name)
        if is_path:
            value = absolute(value)
        if is_list:
            out.append(f"{key}=[{', '.join(_quoted(v.strip()) for v in str(value).split(','))}]")
        elif isinstance(value, str):
            out.append(f"{key}={_quoted(value)}")
        else:
            out.append(f"{key}={value}")
    return out


def absolute(path: str) -> str:
    """Reference meshes are stored as absolute paths, so a run can be resumed from any folder."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _inferred_prior(opts: RunOptions) -> str | None:
    """The prior named by --guidance, or implied by an option only one prior takes (--reference: oracle). The
    default prior's options (--model) imply nothing: without them it is the prior anyway, and against a
    preset or method of another prior the option is the mistake to report."""
    if opts.guidance:
        return canonical_prior(opts.guidance)
    implied = {OPTIONS[name].prior for name in given(opts)
               if OPTIONS[name].prior not in (None, priors.default_prior())}
    return implied.pop() if len(implied) == 1 else None


def choose_method(opts: RunOptions, preset_data: dict | None, prior: str | None) -> methods.Method:
    """--method (with --image, the method's image variant where it has one), else the preset's `method:`, else
    the method whose default prior is `prior`; an error only when the method named and the preset's truly
    differ."""
    from_preset = preset_data.get("method") if preset_data else None
    if opts.method:
        method = methods.get(opts.method)
        if getattr(opts, "image", None) and method.image_variant:
            method = methods.get(method.image_variant)  # `--method dreamgaussian --image X`: its image recipe
        if from_preset and methods.get(str(from_preset)).name != method.name:
            raise UserError(f"preset {opts.preset} is for method {from_preset}, not {method.name}: "
                            f"drop --method or pass a preset of {method.name} ({method.preset})")
        return method
    if from_preset:
        return methods.get(str(from_preset))
    if getattr(opts, "image", None) and (prior is None or prior in methods.for_image().priors):
        return methods.for_image()  # `threed run --image photo.png`: image-to-3D
    return methods.for_prior(prior) if prior else methods.get("dreamfusion")


def resolve(opts: RunOptions, cuda: bool | None = None, only_concerning: bool = False) -> tuple[Config, list[str]]:
    """The Config of a new run, and notes for the user (e.g. which preset was taken and why)."""
    preset_data = load_yaml(preset_path(opts.preset)) if opts.preset else None
    prior = _inferred_prior(opts)
    method = choose_method(opts, preset_data, prior)
    if method.refines:
        raise UserError(f"{method.name} refines the NeRF of an existing run: pass --from RUN_DIR")
    notes: list[str] = []
    preset = opts.preset
    if preset is None:
        if cuda is None:
            device = (opts.device or "auto")
            cuda = device.startswith("cuda") or (device in ("auto", "") and _cuda_visible())
        preset, why = method.default_preset(prior, cuda)
        if why == "no CUDA GPU is visible":
            notes.append(f"no CUDA GPU is visible: using the {preset} preset (pass --preset {method.preset} "
                         f"for the full-size one)")
    preset_prior = ((preset_data if preset_data is not None else load_yaml(preset_path(preset)))
                    .get("guidance", {}) or {}).get("type")
    prior = prior or preset_prior or method.priors[0]
    if prior not in method.priors:
        raise UserError(f"method {method.name} takes the {' or '.join(method.priors)} prior, not {prior}: "
                        f"pass --guidance {method.priors[0]} or another --method")
    overrides = [f"method={method.name}", f"guidance.type={prior}", *option_overrides(opts, prior, only_concerning)]
    cfg = build_config(preset, overrides + list(opts.overrides))
    if cfg.method != method.name:
        raise UserError(f"method={cfg.method} conflicts with the method {method.name} of this run: use --method")
    if cfg.guidance.type not in method.priors:
        raise UserError(f"method {method.name} takes the {' or '.join(method.priors)} prior, not "
                        f"{cfg.guidance.type}: pass --guidance {method.priors[0]}")
    check_prior_sections(cfg, priors.active_sections(cfg.guidance.type, method.sections))
    check_mesh_section(cfg, method)
    check_image(cfg, method)
    cfg.guidance.oracle.reference = absolute(cfg.guidance.oracle.reference)
    return cfg, notes


def check_image(cfg: Config, method: methods.Method) -> None:
    """An image-to-3D method needs its input image, readable now (a bad file should cost no model loading);
    a text method takes none."""
    if method.image and not cfg.image.path:
        raise UserError(f"method {method.name} reconstructs an object from an image: pass --image photo.png")
    if cfg.image.path and not method.image:
        image_methods = [m.name for m in methods.METHODS.values() if m.image]
        raise UserError(f"--image is the input of image-to-3D, but method {method.name} works from text: drop "
                        f"--image" + (f" or pass --method {image_methods[0]}" if image_methods else ""))
    if cfg.image.path:
        from threed.image import reference_image

        cfg.image.path = absolute(cfg.image.path)
        reference_image(cfg.image)


def check_mesh_section(cfg: Config, method: methods.Method) -> None:
    """A stage's section (`mesh:`, `geometry:`, `texture:`, `appearance:`, and those a stage `reads`,
    `gaussians:`) only concerns methods with that stage; elsewhere a setting there would be ignored."""
    used = {stage.section for stage in method.stages}
    for section in STAGE_SECTIONS:
        default = flatten(to_dict(type(getattr(cfg, section))()))  # MeshConfig or its geometry/appearance kind
        current = flatten(to_dict(getattr(cfg, section)))
        changed = [k for k in current if current[k] != default.get(k)]
        if changed and section not in used:
            having = next(m.name for m in methods.METHODS.values() if section in {s.section for s in m.stages})
            keys = ", ".join(f"{section}.{k}" for k in changed[:4])
            raise UserError(f"{keys} set, but method {method.name} has no {section} stage: drop the setting or "
                            f"pass --method {having}")
    # geometry.init (--init-mesh) starts a geometry stage that follows no NeRF (Fantasia3D's)
    starts = [s for s in method.stages if s.section == "geometry"]
    if cfg.geometry.init != type(cfg.geometry.init)() and starts and starts[0].start is not None:
        raise UserError(f"geometry.init (--init-mesh) set, but method {method.name}'s geometry stage starts from its "
                        "NeRF: drop it or pass --method fantasia3d")
    # so does an SDF network: a stage started from a NeRF takes the NeRF's surface as values on the grid
    if cfg.geometry.sdf_network and starts and starts[0].start is not None:
        raise UserError(f"geometry.sdf_network set, but method {method.name}'s geometry stage starts from its NeRF's "
                        "surface on the grid: drop it or pass --method fantasia3d")
    read = {section for stage in method.stages for section in stage.reads}
    for section in {section for m in methods.METHODS.values() for stage in m.stages for section in stage.reads}:
        current = flatten(to_dict(getattr(cfg, section)))
        default = flatten(to_dict(type(getattr(cfg, section))()))
        changed = [k for k in current if current[k] != default.get(k)]
        if changed and section not in read:
            having = next(m.name for m in methods.METHODS.values() if section in {r for s in m.stages for r in s.reads})
            keys = ", ".join(f"{section}.{k}" for k in changed[:4])
            raise UserError(f"{keys} set, but method {method.name} does not read them: drop the setting or pass "
                            f"--method {having}")


def resolve_refine(opts: RunOptions, cuda: bool | None = None) -> tuple[Config, list[str], Path]:
    """The Config of a run refining RUN_DIR = `opts.from_run` (magic3d-refine): RUN_DIR's config (its prompt,
    prior, field and NeRF settings) with the method's preset's `mesh:` section (and its export.texture),
    then the options and
    overrides; `steps` becomes the step of RUN_DIR's newest NeRF checkpoint, which is returned too and
    stands for the new run's finished NeRF stage. Notes say which checkpoint and preset were taken."""
    source = Path(opts.from_run or "")
    method = methods.get(opts.method or "magic3d-refine")
    if not method.refines:
        refining = [m.name for m in methods.METHODS.values() if m.refines]
        raise UserError(f"--from refines an existing run; method {method.name} starts from scratch: pass "
                        f"--method {refining[0]} or drop --from")
    if opts.steps is not None:
        raise UserError(f"--steps sets the NeRF stage's steps, which {method.name} takes from --from: pass "
                        f"mesh.steps=N for the mesh stage")
    if not (source / "config.yaml").is_file():
        raise UserError(f"--from {source} is not a threed run directory (no config.yaml): pass the --out folder "
                        f"of a `threed run`")
    saved = build_config(base=load_yaml(source / "config.yaml"))
    first = method.stages[0].name
    checkpoint = RunDir(source).latest_checkpoint(first)
    if checkpoint is None:
        raise UserError(f"--from {source} (method {saved.method}) has no NeRF checkpoint (checkpoints/{first}/"
                        f"step-*.pt) to refine: pass a run of dreamfusion or magic3d that has trained")
    step = checkpoint_step(checkpoint)
    notes = [f"refining {source} from its NeRF checkpoint {checkpoint.name}"
             + (f" (the run is unfinished: step {step} of {saved.steps})" if step < saved.steps else "")]
    prior = canonical_prior(opts.guidance) if opts.guidance else saved.guidance.type
    if prior not in method.priors:
        raise UserError(f"{source} used the {saved.guidance.type} prior; {method.name} takes "
                        f"{' or '.join(method.priors)}: pass --guidance sd (with --model) or --guidance oracle "
                        f"(with --reference)")
    base = to_dict(saved)
    if prior != saved.guidance.type:  # the source's prior settings no longer apply
        section = PRIOR_SECTIONS[saved.guidance.type]
        base["guidance"][section] = to_dict(type(getattr(saved.guidance, section))())
    for section in METHOD_SECTIONS:  # nor do its method's own (e.g. a prolificdreamer run's guidance.vsd) ...
        if section not in method.sections:
            base["guidance"][section] = to_dict(type(getattr(saved.guidance, section))())
    for section in STAGE_SECTIONS:  # ... nor its later stages' (a prolificdreamer run's geometry and texture)
        base[section] = to_dict(type(getattr(saved, section))())
    preset = opts.preset
    if preset is None:
        if cuda is None:
            device = opts.device or saved.device or "auto"
            cuda = device.startswith("cuda") or (device in ("auto", "") and _cuda_visible())
        preset, _ = method.default_preset(prior, cuda)
    preset_data = load_yaml(preset_path(preset))
    mesh = preset_data.get("mesh")
    if not isinstance(mesh, dict):
        raise UserError(f"preset {preset} has no mesh: section to refine with: pass --preset magic3d (or another "
                        f"preset of magic3d)")
    notes.append(f"mesh stage settings from the {preset} preset")
    base.update(method=method.name, steps=step, mesh=mesh)
    texture = (preset_data.get("export") or {}).get("texture")
    if texture is not None:  # the refined mesh is exported as the preset says (textured, for magic3d's)
        base["export"]["texture"] = texture
    base["guidance"]["type"] = prior
    overrides = option_overrides(opts, prior) + list(opts.overrides)
    cfg = build_config(base=base, overrides=overrides)
    if cfg.method != method.name or cfg.steps != step:
        raise UserError("method and steps of a refinement come from --method and --from: drop the "
                        "method= and steps= overrides")
    check_prior_sections(cfg, priors.active_sections(cfg.guidance.type, method.sections))
    cfg.guidance.oracle.reference = absolute(cfg.guidance.oracle.reference)
    return cfg, notes, checkpoint


# Settings a resumed run may change: how long it trains (each stage), where, how often it logs and saves, how
# the guidance is compiled (the same math), and export.
RESUMABLE = ("steps", *(f"{section}.steps" for section in STAGE_SECTIONS), "device", "log_every",
             "checkpoint_every", "keep_checkpoints", "guidance.sd.compile", "guidance.sd.compile_vae")
RESUMABLE_PREFIXES = ("export.",)


def resume_config(saved: Config, opts: RunOptions) -> Config:
    """The saved config of a run with the options of `threed run --resume`; any option or key that would
    change what the run trains (prompt, model, seed, prior, ...) is an error naming it."""
    if opts.preset:
        raise UserError("--preset cannot change a run being resumed: drop it, or start a new run with --out")
    if opts.method and methods.get(opts.method).name != saved.method:
        raise UserError(f"--method {opts.method} differs from the run's method {saved.method}: drop it, or start "
                        f"a new run with --out")
    if opts.guidance and canonical_prior(opts.guidance) != saved.guidance.type:
        raise UserError(f"--guidance {opts.guidance} differs from the run's prior {saved.guidance.type}: drop it, "
                        f"or start a new run with --out")
    before = flatten(to_dict(saved))
    cfg = build_config(base=to_dict(saved), overrides=option_overrides(opts, saved.guidance.type) + opts.overrides)
    after = flatten(to_dict(cfg))
    changed = [k for k in after if after[k] != before.get(k)]
    bad = [k for k in changed if k not in RESUMABLE and not k.startswith(RESUMABLE_PREFIXES)]
    if bad:
        by_key = {OPTIONS[name][0]: flag(name) for name in OPTIONS}
        named = ", ".join(f"{by_key.get(k, k)} ({before.get(k)!r} -> {after[k]!r})" for k in bad)
        raise UserError(f"a resumed run keeps its settings, but these would change: {named}; drop them, or start "
                        f"a new run with --out (resumable: --steps, <stage>.steps, --device, "
                        f"{', '.join(RESUMABLE[2 + len(STAGE_SECTIONS):])}, export.*)")
    return cfg

