"""The bench's plan: which (prompt, method, seed) entries it trains, each with the config `threed run` would
build from the same options (threed/spec.py), and the checks that fail in seconds rather than after hours of
training (bad input, options that concern no method, missing weights)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
from pathlib import Path

from threed import methods as registry
from threed import spec
from threed.config import PRIOR_SECTIONS, Config, load_yaml, parse_override, preset_path
from threed.errors import UserError

DEFAULT_METHODS = "dreamfusion,clip"  # with --prompts; with --images: the image-to-3D method (zero123)


def method_label(method: str, prior: str) -> str:
    """A method's name in folders and tables: the method, and its prior when not the method's default."""
    return method if prior == registry.get(method).priors[0] else f"{method}-{prior}"


@dataclasses.dataclass
class Entry:
    """One (prompt, method, seed) of the bench: its config and where its run, evaluation, thumbnail and log go."""

    method: str  # the registry's name
    prior: str  # guidance.type
    prompt: str  # "" for an image of `threed bench --images`
    prompt_index: int  # the prompt's (or the image's) place in the bench's inputs
    seed: int
    cfg: Config
    run_dir: Path
    eval_path: Path
    thumb_path: Path
    log_path: Path
    image: str = ""  # image-to-3D: the input image's absolute path

    @property
    def subject(self) -> str:
        """What the entry makes 3-D: its prompt, or its input image's file name."""
        return Path(self.image).name if self.image else self.prompt

    @property
    def label(self) -> str:
        return method_label(self.method, self.prior)

    @property
    def name(self) -> str:
        return f"{self.label}/{self.run_dir.name}"

    @property
    def budget(self) -> list[tuple[str, int]]:
        """(stage, its steps) for each stage the entry trains: `--steps` is the first stage's, as for `threed
        run`; a later stage brings its own (magic3d's mesh stage: mesh.steps)."""
        return registry.get(self.cfg.method).planned_steps(self.cfg)

    @property
    def total_steps(self) -> int:
        """The entry's whole budget: every stage's steps (the last step on its metrics.jsonl's axis)."""
        return sum(steps for _, steps in self.budget)


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} not found: pass --prompts with a text file of one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text: pass a plain text file, one prompt per line") from None
    prompts: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text in seen:
            raise UserError(f"prompt '{text}' appears twice in {path} (lines {seen[text]} and {n}); "
                            f"R-precision needs distinct prompts: remove one")
        seen[text] = n
        prompts.append(text)
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts: write one prompt per line (# starts a comment)")
    return prompts


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_images(folder: str | Path) -> list[Path]:
    """The images of `folder` (not its subfolders), by name: the inputs of `threed bench --images`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise UserError(f"images folder {folder} {what}: pass --images with a folder of PNG, JPEG or WebP images")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"images folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): put the input "
                        f"images (RGBA PNG, or any image with pip install 'threed[image]') in it")
    return [p.resolve() for p in images]


def bench_inputs(args: argparse.Namespace) -> tuple[list[str], list[Path]]:
    """(prompts, images): what the bench's entries start from, one of them empty."""
    if getattr(args, "images", None):
        return [], read_images(args.images)
    return read_prompts(args.prompts), []


def default_methods(args: argparse.Namespace) -> str:
    """--methods, else the text methods' default, or the image methods for --images."""
    if args.methods:
        return args.methods
    if getattr(args, "images", None):
        return registry.for_image().name
    return DEFAULT_METHODS


def check_inputs(methods: list[registry.Method], images: bool) -> None:
    """An image bench takes only image-to-3D methods, a prompt bench only text methods."""
    wrong = [m.name for m in methods if m.image != images]
    if not wrong:
        return
    if images:
        raise UserError(f"method {wrong[0]} works from text, not from --images: drop it from --methods or pass "
                        f"--prompts FILE in a bench of its own")
    raise UserError(f"method {wrong[0]} reconstructs an object from an image: pass --images DIR (a folder of "
                    f"input images) instead of --prompts")


def get_method(name: str, where: str) -> registry.Method:
    """A method from the registry (aliases included); a prior's name gets the spelling that selects it."""
    try:
        return registry.get(name)
    except UserError:
        prior = spec.PRIOR_ALIASES.get(name.strip(), name.strip())
        if prior in spec.PRIORS:
            method = registry.for_prior(prior).name
            raise UserError(f"'{name.strip()}' in {where} is a prior, not a method: pass --methods {method} "
                            f"--guidance {prior}" + (" --reference MESH" if prior == "oracle" else "")) from None
        raise UserError(f"unknown method '{name.strip()}' in {where}: choose one of {', '.join(registry.names())}") from None


def parse_methods(text: str) -> list[registry.Method]:
    found: dict[str, registry.Method] = {}
    for name in (m.strip() for m in text.split(",")):
        if name:
            method = get_method(name, "--methods")
            found.setdefault(method.name, method)
    if not found:
        raise UserError("--methods is empty: pass e.g. --methods dreamfusion,clip")
    return list(found.values())


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"bad --seeds '{text}': write integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise UserError("--seeds is empty: pass e.g. --seeds 0,1")
    return list(dict.fromkeys(seeds))


def parse_presets(items: list[str], methods: list[registry.Method]) -> dict[str, str | None]:
    """--preset P (every method) and --preset METHOD=P (one method, whatever the order); None: the method's
    own preset, chosen by spec.resolve."""
    every: str | None = None
    own: dict[str, str] = {}
    names = [m.name for m in methods]
    for item in items:
        if "=" in item:
            name, preset = (s.strip() for s in item.split("=", 1))
            method = get_method(name, f"--preset {item}")
            if method.name not in names:
                raise UserError(f"--preset {item} is for method {method.name}, which is not in --methods "
                                f"({', '.join(names)}): add it or drop the preset")
            if method.name in own:
                raise UserError(f"two presets for method {method.name} (--preset {method.name}={own[method.name]} "
                                f"and --preset {item}): keep one")
            own[method.name] = preset
        else:
            if every is not None:
                raise UserError(f"two presets for every method (--preset {every} and --preset {item}): keep one, "
                                f"or write --preset METHOD=PRESET")
            every = item.strip()
    return {name: own.get(name, every) for name in names}


def split_overrides(items: list[str], methods: list[registry.Method]) -> tuple[list[str], dict[str, list[str]]]:
    """Plain `key=value` overrides (for every method) and `METHOD:key=value` ones (for that method)."""
    plain: list[str] = []
    own: dict[str, list[str]] = {m.name: [] for m in methods}
    for item in items:
        key = item.split("=", 1)[0]
        if ":" in key:
            name, rest = item.split(":", 1)
            method = get_method(name, f"the override {item}")
            if method.name not in own:
                raise UserError(f"the override {item} is for method {method.name}, which is not in --methods "
                                f"({', '.join(own)}): add it or drop the override")
            own[method.name].append(rest)
        else:
            if key.strip() == "guidance.type":
                raise UserError(f"{item} would set one prior for every method: pass --guidance "
                                f"{item.split('=', 1)[1].strip()} (applied to the methods that take it) or "
                                f"METHOD:guidance.type=... for one method")
            plain.append(item)
    return plain, own


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _prior_of_key(key: str) -> str | None:
    """The prior whose section `key` is in (guidance.sd.* -> stable_diffusion), or None."""
    for prior, section in PRIOR_SECTIONS.items():
        if key.startswith(f"guidance.{section}."):
            return prior
    return None


def method_prior(method: registry.Method, guidance: str | None, preset: str | None, own: list[str]) -> str:
    """The method's prior: its own guidance.type override, else --guidance where the method takes that prior,
    else its preset's, else its default."""
    for item in reversed(own):
        if _override_key(item) == "guidance.type":
            prior = spec.canonical_prior(str(parse_override(item)["guidance"]["type"]))
            if prior not in method.priors:
                raise UserError(f"{method.name}:{item}: method {method.name} takes the {' or '.join(method.priors)} "
                                f"prior, not {prior}: drop the override")
            return prior
    if guidance and spec.canonical_prior(guidance) in method.priors:
        return spec.canonical_prior(guidance)
    if preset:
        from_preset = (load_yaml(preset_path(preset)).get("guidance", {}) or {}).get("type")
        if from_preset:
            return str(from_preset)
    return method.priors[0]


def cuda_wanted(device: str | None, cluster_gpus: bool | None = None) -> bool:
    """Whether runs will have a CUDA GPU (picks each method's GPU or CPU preset), as `threed run` decides;
    with Ray, whether the cluster has GPUs."""
    device = device or "auto"
    if device.startswith("cuda"):
        return True
    if device not in ("auto", ""):
        return False
    if cluster_gpus is not None:
        return cluster_gpus
    import torch

    return torch.cuda.is_available()


def slugify(prompt: str) -> str:
    """Readable and collision-free: the prompt's words, cut to 48 characters, plus a short hash."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "prompt"
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def make_plan(args: argparse.Namespace, cuda: bool | None = None) -> tuple[list[Entry], list[str]]:
    """Every entry with its config (through spec.resolve, as `threed run`), and notes for the user.

    Model options (--model, --clip-model, --reference, ...) and plain overrides of a prior's section
    (guidance.sd.*, ...) go to the methods whose prior they concern; one that concerns no method of the
    bench is an error. `cuda`: whether the runs will see a CUDA GPU (None: this machine's)."""
    prompts, images = bench_inputs(args)
    methods = parse_methods(default_methods(args))
    check_inputs(methods, bool(images))
    seeds = parse_seeds(args.seeds)
    if args.steps is None or args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.eval_views < 1:
        raise UserError("--eval-views must be at least 1")
    if args.eval_size < 8:
        raise UserError("--eval-size must be at least 8")
    if args.reference and not Path(args.reference).expanduser().is_file():
        raise UserError(f"reference mesh {args.reference} not found: pass an existing OBJ/PLY/GLB file")
    presets = parse_presets(args.preset, methods)
    plain, own = split_overrides(list(getattr(args, "overrides", None) or []), methods)
    opts = spec.RunOptions.from_args(args)
    priors = {m.name: method_prior(m, opts.guidance, presets[m.name], own[m.name]) for m in methods}
    used = ", ".join(f"{m.name} ({priors[m.name]})" for m in methods)
    if opts.guidance and spec.canonical_prior(opts.guidance) not in priors.values():
        prior = spec.canonical_prior(opts.guidance)
        raise UserError(f"--guidance {opts.guidance}: no method of this bench takes the {prior} prior ({used}); "
                        f"add --methods {registry.for_prior(prior).name}")
    def unused(what: str, prior: str) -> UserError:
        takers = [m.name for m in methods if prior in m.priors]
        fix = (f"pass --guidance {prior} ({', '.join(takers)} take{'s' if len(takers) == 1 else ''} it)" if takers
               else f"add --methods {registry.for_prior(prior).name}")
        return UserError(f"{what} concerns the {prior} prior, which no method of this bench uses ({used}): "
                         f"drop it, or {fix}")

    for name in spec.given(opts):
        concerns = spec.OPTIONS[name][1]
        takers = set(spec.SHARED_KEYS.get(name, {})) or {concerns}  # --model: Stable Diffusion's and Zero123's
        if concerns is not None and not takers & set(priors.values()):
            raise unused(spec.flag(name), concerns)
    for item in plain:
        prior = _prior_of_key(_override_key(item))
        if prior is not None and prior not in priors.values():
            raise unused(item, prior)
    if cuda is None:
        cuda = cuda_wanted(args.device)
    notes: list[str] = []
    for m in methods:
        if presets[m.name]:
            from_preset = load_yaml(preset_path(presets[m.name])).get("method")
            if from_preset and registry.get(str(from_preset)).name != m.name:
                raise UserError(f"preset {presets[m.name]} is for method {from_preset}, not {m.name}: pass "
                                f"--preset METHOD=PRESET for each method (e.g. --preset {m.name}={m.preset})")
        else:
            preset, why = m.default_preset(priors[m.name], cuda)
            if why == "no CUDA GPU is visible":
                notes.append(f"no CUDA GPU is visible: {method_label(m.name, priors[m.name])} uses the {preset} "
                             f"preset (pass --preset {m.name}={m.preset} for the full-size one)")

    out = Path(args.out)
    plan = []
    inputs: list[tuple[str, str]] = [(p, "") for p in prompts] + [("", str(p)) for p in images]
    for m in methods:
        prior = priors[m.name]
        label = method_label(m.name, prior)
        overrides = [o for o in plain if _prior_of_key(_override_key(o)) in (None, prior)] + own[m.name]
        for i, (prompt, image) in enumerate(inputs):
            for seed in seeds:
                run_opts = dataclasses.replace(opts, method=m.name, preset=presets[m.name], guidance=prior,
                                               prompt=prompt or None, image=image or None, seed=seed,
                                               overrides=overrides)
                cfg, _ = spec.resolve(run_opts, cuda=cuda, only_concerning=True)
                if cfg.guidance.type == "oracle" and not cfg.guidance.oracle.reference:
                    raise UserError(f"{label} uses the oracle prior, which needs a reference mesh: pass --reference MESH")
                stem = f"{slugify(Path(image).name if image else prompt)}-s{seed}"
                plan.append(Entry(m.name, prior, prompt, i, seed, cfg, out / "runs" / label / stem,
                                  out / "evals" / label / f"{stem}.json", out / "thumbs" / label / f"{stem}.png",
                                  out / "logs" / label / f"{stem}.log", image=image))
    return plan, notes


def as_evaluator_error(e: UserError) -> UserError:
    """A CLIP loading error phrased for the evaluator's own flags."""
    text = str(e).replace("--clip-pretrained", "--eval-clip-pretrained").replace("--clip-model", "--eval-clip-model")
    return UserError(f"evaluator CLIP: {text}")


def check_zero123(model: str, image_encoder: str) -> None:
    """The Zero123 model is a checkpoint file that exists, or a folder or hub id whose parts are on disk (or
    downloadable): the files threed/guidance/zero123_model.py will ask for."""
    from threed.guidance.hub import resolve_pretrained
    from threed.guidance.zero123_model import DIFFUSERS_PARTS, LOCAL_HINT, PROJECTION_FOLDERS, is_checkpoint_file

    path = Path(model).expanduser()
    if is_checkpoint_file(model) or path.is_file():
        if not path.is_file():
            raise UserError(f"Zero123 checkpoint {model} not found: pass {LOCAL_HINT}, or a hub id")
        return
    resolve_pretrained(model, "Zero123", required=DIFFUSERS_PARTS if not image_encoder else ("unet", "vae"),
                       extra_patterns=tuple(f"{p}/*" for p in PROJECTION_FOLDERS) + ("scheduler/*",),
                       local_hint=LOCAL_HINT)


def check_weights(plan: list[Entry], eval_model: str | None, eval_pretrained: str | None) -> None:
    """Every model the benchmark will need is on disk (or downloadable) before hours of training start
    (`eval_model` None: the bench has no evaluator CLIP, as with --images)."""
    from threed.clip_models import resolve_pretrained as resolve_clip
    from threed.guidance.hub import SD_SUBFOLDERS, pinned_revision
    from threed.guidance.hub import resolve_pretrained as resolve_sd

    if eval_model is not None:
        try:
            resolve_clip(eval_model, eval_pretrained)
        except UserError as e:
            raise as_evaluator_error(e) from None
    checked: set[tuple[str, ...]] = set()
    for e in plan:
        g = e.cfg.guidance
        needs: list[tuple[str, ...]] = list(zip(g.clip.models, g.clip.pretrained)) if g.type == "clip" else []
        if g.type == "stable_diffusion":
            needs.append(("sd", g.sd.model, g.sd.revision, g.sd.vae))
        if g.type == "zero123":
            needs.append(("zero123", g.zero123.model, g.zero123.image_encoder))
        for need in needs:
            if need in checked:
                continue
            checked.add(need)
            if need[0] == "zero123":
                check_zero123(need[1], need[2])
            elif need[0] == "sd":  # the files the run itself will ask for, at the same revision
                _, model, revision, vae = need
                required = tuple(p for p in SD_SUBFOLDERS if not (vae == "tiny" and p == "vae"))
                resolve_sd(model, "Stable Diffusion", required=required, revision=pinned_revision(model, revision))
            else:
                resolve_clip(*need)

