"""Recipe parity: every preset against the published recipe it follows (tests/data/recipes/).

Each GPU preset has a file in tests/data/recipes/ recording, for every setting that changes the result,
threed's config key and value, the reference's value and where it is written, and, where they differ, the
deviation and its reason. This test holds the record to the code:

- a recorded threed value must be the preset's (the table cannot drift from configs/);
- a value that differs from the reference must be listed as a deviation, and a listed deviation whose
  values no longer differ is stale (fix the record when a deviation is removed);
- every config key a GPU preset uses is recorded, compared or declared not compared (common.yaml), so a new
  key cannot slip past;
- the CPU and oracle presets are declared reductions of a GPU preset: their recorded changes must be exactly
  the keys in which they differ from it;
- docs/RECIPES.md is generated from the record; regenerate it with

      PYTHONPATH=$PWD python tests/test_recipes.py --write

Some settings are behaviour rather than a config value (where the point light goes, how often a render is
plain albedo): a `probe` measures them from the code, and the measured value is compared like a config value.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from threed import methods, priors
from threed.config import (CONFIG_DIR, STAGE_SECTIONS, Config, _GuidanceSettings, all_keys,
                           build_config, flatten, to_dict)
from threed.schedule import Schedule

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "recipes"
DOC = ROOT / "docs" / "RECIPES.md"


# -- the record ------------------------------------------------------------------------------------------

def load(name: str) -> dict:
    return yaml.safe_load((DATA / name).read_text())


def common() -> dict:
    return load("common.yaml")


def records() -> dict[str, dict]:
    """preset name -> its record (one YAML per preset; `inherits` merged in)."""
    raw = {p.stem: load(p.name) for p in sorted(DATA.glob("*.yaml")) if p.stem != "common"}
    return {name: resolve(name, raw) for name in raw}


def entry_id(entry: dict) -> str:
    return entry.get("key") or entry.get("probe") or entry["setting"]


def resolve(name: str, raw: dict[str, dict]) -> dict:
    """A record with the entries of the record it `inherits` from, its own replacing those with the same id and
    those it `omits` (ids of settings it does not have, e.g. another prior's) dropped."""
    record = dict(raw[name])
    parent = record.get("inherits")
    if parent:
        base = resolve(parent, raw)
        own = {entry_id(e): e for e in record.get("settings", [])}
        omitted = set(record.get("omits", []))
        unknown = omitted - {entry_id(e) for e in base["settings"]}
        assert not unknown, f"{name}: omits {sorted(unknown)}, which {parent}'s record does not have"
        merged = [own.pop(entry_id(e), e) for e in base["settings"] if entry_id(e) not in omitted]
        record["settings"] = merged + list(own.values())
        record.setdefault("reference", base.get("reference"))
    return record


def ordered(names: list[str]) -> list[str]:
    """Presets in common.yaml's `order` (the page's order), any unlisted ones last."""
    order = common()["order"]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def gpu_records() -> dict[str, dict]:
    found = {name: r for name, r in records().items() if "derived_from" not in r}
    return {name: found[name] for name in ordered(list(found))}


def derived_records() -> dict[str, dict]:
    found = {name: r for name, r in records().items() if "derived_from" in r}
    return {name: found[name] for name in ordered(list(found))}


# -- values in the preset form ---------------------------------------------------------------------------

def plain(value: Any) -> Any:
    """A value as a preset writes it: schedules as numbers or lists, tuples as lists."""
    if isinstance(value, Schedule):
        return value.to_plain()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def preset_values(cfg: Config) -> dict[str, Any]:
    return flatten(to_dict(cfg))


def same(a: Any, b: Any) -> bool:
    """Equal as recorded values: numbers within float rounding, lists elementwise, anything else by ==."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def active_keys(cfg: Config) -> list[str]:
    """The keys a run of this preset reads: the guidance sections of its prior and method only, a stage's
    section (mesh, geometry, texture, and those a stage `reads`: gaussians) only for methods with that stage, the
    input image's (image) only for image-to-3D methods."""
    method = methods.get(cfg.method)
    active_sections = priors.active_sections(cfg.guidance.type, method.sections)
    own_stages = {stage.section for stage in method.stages if stage.section}
    own_stages |= {section for stage in method.stages for section in stage.reads}
    stage_sections = {*STAGE_SECTIONS, *(s for m in methods.METHODS.values() for st in m.stages for s in st.reads)}
    keys = []
    for key in all_keys():
        parts = key.split(".")
        if parts[0] == "guidance" and len(parts) == 3 and parts[1] not in active_sections:
            continue
        if parts[0] in stage_sections and parts[0] not in own_stages:
            continue
        if parts[0] == "image" and not method.image:  # the input of image-to-3D methods only
            continue
        keys.append(key)
    return keys


# -- probes: behaviour measured from the code ------------------------------------------------------------

def _light_distance(cfg: Config) -> str:
    """Whether the training point light's distance is a multiple of the camera distance or absolute: cameras
    at distance 10 show which (render.light_distance is (0.8, 1.5) in every preset). The cameras are drawn as
    the trainer draws them (threed/trainer.py, train_step)."""
    from threed.cameras import sample_cameras

    camera = dataclasses.replace(cfg.camera, distance=(10.0, 10.0))
    cams = sample_cameras(camera, 256, 8, 8, torch.Generator().manual_seed(0), cfg.render)
    r = cams.light_position.norm(dim=-1)
    lo, hi = cfg.render.light_distance
    if bool(((r >= 10 * lo - 1e-4) & (r <= 10 * hi + 1e-4)).all()):
        return "multiple of the camera distance"
    if bool(((r >= lo - 1e-4) & (r <= hi + 1e-4)).all()):
        return "absolute (scene units)"
    return f"other: {float(r.min()):.3g} to {float(r.max()):.3g} at camera distance 10"


def _albedo_share(section: Any) -> float:
    """The share of training steps rendered as plain albedo after the albedo-only warm-up, to 0.05 (4000
    draws from a fixed seed: deterministic), picked as a scene picks them from its section (render or mesh:
    threed/scenes/nerf.py and mesh.py, pick_shading)."""
    from threed.render.shading import pick_shading

    generator = torch.Generator().manual_seed(0)
    step = section.albedo_only_steps + 10**6
    picks = [pick_shading(section.shading, step, section.albedo_only_steps, section.textureless_prob, generator,
                          section.albedo_prob) for _ in range(4000)]
    return round(20 * picks.count("albedo") / len(picks)) / 20


def _weighting_choices(cfg: Config) -> list[str]:
    """The SDS weightings `guidance.weighting` accepts."""
    hint = typing.get_type_hints(_GuidanceSettings)["weighting"]
    return list(typing.get_args(hint))


PROBES: dict[str, Callable[[Config], Any]] = {
    "light_distance": _light_distance,
    "albedo_share_after_warmup": lambda cfg: _albedo_share(cfg.render),
    "mesh_albedo_share_after_warmup": lambda cfg: _albedo_share(cfg.mesh),
    "weighting_choices": _weighting_choices,
}


def current(entry: dict, cfg: Config, values: dict[str, Any]) -> Any:
    """threed's value for an entry: its probe's measurement, else the preset's value of its key."""
    if "probe" in entry:
        return PROBES[entry["probe"]](cfg)
    return values[entry["key"]]


# -- the checks ------------------------------------------------------------------------------------------

def entry_problems(preset: str, entry: dict, cfg: Config, values: dict[str, Any]) -> list[str]:
    """Why an entry is wrong (empty: it is right)."""
    where = f"{preset}: {entry_id(entry)}"
    allowed = {"key", "probe", "setting", "threed", "reference", "as_written", "source", "deviation", "note",
               "measured", "unused", "also"}
    unknown = set(entry) - allowed
    if unknown:
        return [f"{where}: unknown fields {sorted(unknown)}"]
    if "key" in entry and entry["key"] not in values:
        return [f"{where}: no such config key"]
    if "probe" in entry and entry["probe"] not in PROBES:
        return [f"{where}: no probe named {entry['probe']!r} in tests/test_recipes.py"]
    if "key" not in entry and "probe" not in entry:  # a setting threed has no key for: words only
        if "deviation" not in entry and "note" not in entry:
            return [f"{where}: a setting without a threed key needs a deviation or a note"]
        return [] if "source" in entry or "unused" in entry else [f"{where}: no source"]
    if "threed" not in entry:
        return [f"{where}: no recorded threed value"]
    try:
        now = current(entry, cfg, values)
    except Exception as e:  # a probe broken by a change of the code: the record needs a look
        return [f"{where}: probe failed ({type(e).__name__}: {e}); update the probe and the record"]
    problems = []
    if not same(plain(now), entry["threed"]):
        problems.append(f"{where}: recorded threed value {entry['threed']!r}, but the preset has {plain(now)!r}")
    if "unused" in entry:
        if "reference" in entry or "deviation" in entry:
            problems.append(f"{where}: an unused key takes no reference or deviation")
        return problems
    if "reference" not in entry or "source" not in entry:
        return problems + [f"{where}: needs a reference value and its source (or `unused: why`)"]
    differs = not same(plain(now), entry["reference"])
    if differs and not entry.get("deviation"):
        problems.append(f"{where}: threed {plain(now)!r} differs from the reference {entry['reference']!r} and "
                        f"is not recorded as a deviation")
    if not differs and entry.get("deviation"):
        problems.append(f"{where}: recorded as a deviation, but threed now has the reference's value "
                        f"{entry['reference']!r}: the entry is stale, update it")
    return problems


def test_every_preset_has_a_record():
    presets = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    recorded = set(records())
    assert presets - recorded == set(), f"presets without a record in {DATA}: {sorted(presets - recorded)}"
    assert recorded - presets == set(), f"records of presets that do not exist: {sorted(recorded - presets)}"
    assert sorted(common()["order"]) == sorted(presets), "common.yaml's order must list every preset once"


@pytest.mark.parametrize("preset", sorted(gpu_records()))
def test_gpu_preset_matches_its_reference(preset):
    record = gpu_records()[preset]
    cfg = build_config(preset)
    values = preset_values(cfg)
    problems = []
    for entry in record["settings"]:
        problems += entry_problems(preset, entry, cfg, values)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("preset", sorted(gpu_records()))
def test_gpu_preset_records_every_key_it_uses(preset):
    record = gpu_records()[preset]
    cfg = build_config(preset)
    not_compared = set(common()["not_compared"])
    ids = [entry_id(e) for e in record["settings"]]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"{preset}: entries recorded twice: {duplicates}"
    keys = {e["key"] for e in record["settings"] if "key" in e}
    missing = [k for k in active_keys(cfg) if k not in keys and k not in not_compared]
    assert not missing, f"{preset}: keys neither recorded nor declared not compared (common.yaml): {missing}"
    inactive = sorted(keys - set(active_keys(cfg)))
    assert not inactive, f"{preset}: recorded keys this preset never reads: {inactive}"


def test_not_compared_keys_exist_and_say_why():
    keys = set(all_keys())
    for key, why in common()["not_compared"].items():
        assert key in keys, f"common.yaml not_compared: no such key {key}"
        assert isinstance(why, str) and why.strip(), f"common.yaml not_compared: {key} needs a reason"


def test_code_level_entries():
    """Differences in code that no preset's value shows (e.g. the names of the SDS weightings)."""
    cfg = build_config("dreamfusion-sd")
    values = preset_values(cfg)
    problems = []
    for entry in common()["code"]:
        problems += entry_problems("code", entry, cfg, values)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("preset", sorted(derived_records()))
def test_derived_preset_changes_are_exactly_its_differences(preset):
    """A CPU or oracle preset is its GPU preset with recorded changes, no more and no fewer, among the keys
    its run reads (not those common.yaml leaves uncompared: logging, checkpoints, video, file formats)."""
    record = derived_records()[preset]
    base = record["derived_from"]
    assert base in gpu_records(), f"{preset}: derived from {base}, which is not a GPU preset with a record"
    cfg = build_config(preset)
    ours, theirs = preset_values(cfg), preset_values(build_config(base))
    compared = [k for k in active_keys(cfg) if k not in common()["not_compared"]]
    differences = {k: ours[k] for k in compared if not same(ours[k], theirs[k])}
    recorded = record.get("changes") or {}
    problems = [f"{preset}: {k} is {ours[k]!r} ({base}: {theirs[k]!r}) but not recorded as a change"
                for k in differences if k not in recorded]
    problems += [f"{preset}: recorded change {k}: {v!r}, but the preset has {ours.get(k)!r} ({base}: {theirs.get(k)!r})"
                 for k, v in recorded.items() if k not in differences or not same(differences[k], v)]
    assert record.get("why", "").strip(), f"{preset}: say why it is derived"
    assert not problems, "\n".join(problems)


def test_recipes_doc_is_generated_from_the_record():
    expected = render_doc()
    actual = DOC.read_text() if DOC.exists() else ""
    assert actual == expected, ("docs/RECIPES.md differs from the record in tests/data/recipes/; regenerate it: "
                                "PYTHONPATH=$PWD python tests/test_recipes.py --write")


def test_recipes_doc_mentions_every_recorded_key():
    text = DOC.read_text()
    for preset, record in gpu_records().items():
        assert f"`{preset}`" in text
        for entry in record["settings"]:
            if "key" in entry:
                assert f"`{entry['key']}`" in text, f"docs/RECIPES.md does not mention {preset}'s {entry['key']}"


# -- docs/RECIPES.md ---------------------------------------------------------------------------------------

def show(value: Any) -> str:
    if value is None:
        return "–"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def entry_row(entry: dict) -> str:
    if "key" in entry:
        setting = f"`{entry['key']}`"
    elif "probe" in entry:
        setting = f"{entry.get('setting', entry['probe'])} (probe `{entry['probe']}`)"
    else:
        setting = entry["setting"]
    threed = show(entry["threed"]) if "threed" in entry else "(no key)"
    if "unused" in entry:
        reference, note = "–", f"not used: {entry['unused']}"
    else:
        reference = show(entry.get("reference"))
        if "as_written" in entry:
            reference += f" (as written: {show(entry['as_written'])})"
        parts = []
        if entry.get("deviation"):
            parts.append(f"**deviation** – {entry['deviation']}")
        if entry.get("note"):
            parts.append(entry["note"])
        if entry.get("measured"):
            parts.append(f"measured: {entry['measured']}")
        if entry.get("also"):
            parts.append(f"also: {entry['also']}")
        note = " ".join(parts)
    cells = [setting, f"`{threed}`" if "threed" in entry else threed, cell(reference), cell(entry.get("source", "")),
             cell(note)]
    return "| " + " | ".join(cells) + " |"


def category(deviation: str) -> str:
    """The kind of a deviation, from how its reason starts (see tests/data/recipes/intro.md)."""
    text = deviation.strip().lower()
    for kind in ("being fixed", "not implemented", "reason not recorded", "stated reason contradicted", "deliberate",
                 "no counterpart", "not comparable"):
        if text.startswith(kind):
            return kind
    return "other stated reason"


def summary(entries: list[dict]) -> str:
    kinds: dict[str, int] = {}
    for e in entries:
        if e.get("deviation"):
            kinds[category(e["deviation"])] = kinds.get(category(e["deviation"]), 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    total = sum(kinds.values())
    return f"{len(entries)} rows, {total} deviations" + (f" ({parts})." if parts else ".")


def render_doc() -> str:
    c = common()
    lines = [(DATA / "intro.md").read_text().rstrip(), ""]
    lines += ["## Sources", ""]
    for name, source in c["sources"].items():
        lines.append(f"- **{name}**: {source}")
    lines.append("")
    for preset, record in gpu_records().items():
        lines += [f"## `{preset}`", "", cell(record["about"]), "", f"Reference: {record['reference']}."]
        own = record["settings"]
        if record.get("inherits"):
            own = load(f"{preset}.yaml")["settings"]
            lines[-1] += (f" Every setting not listed here is `{record['inherits']}`'s, with its row in that table "
                          f"(the test checks each against this preset's value)")
            omits = load(f"{preset}.yaml").get("omits")
            lines[-1] += (f", except {', '.join(f'`{k}`' for k in omits)}, which this preset does not have." if omits
                          else ".")
        lines[-1] += " " + summary(own)
        lines += ["", "| setting | threed | reference | source | note |", "| --- | --- | --- | --- | --- |"]
        lines += [entry_row(e) for e in own]
        lines.append("")
    lines += ["## Differences in code, not in a preset", "",
              "| setting | threed | reference | source | note |", "| --- | --- | --- | --- | --- |"]
    lines += [entry_row(e) for e in c["code"]]
    lines += ["", "## Derived presets (CPU and oracle)", "",
              "Each is a declared reduction of a GPU preset, not a published recipe: the test checks that the "
              "changes listed are exactly the keys in which it differs from that preset (among the keys its run "
              "reads, less those no table compares). The GPU preset's deviations carry over unless changed here.",
              ""]
    for preset, record in derived_records().items():
        changes = ", ".join(f"`{k}` {show(v)}" for k, v in (record.get("changes") or {}).items())
        lines += [f"### `{preset}`", "", f"Derived from `{record['derived_from']}`. {cell(record['why'])}", "",
                  f"Changes: {changes}.", ""]
    lines += ["## Keys not compared", "",
              "These keys change how a run is executed, logged or written, not what it trains; they are in no "
              "table above.", "", "| key | why not compared |", "| --- | --- |"]
    lines += [f"| `{k}` | {cell(v)} |" for k, v in c["not_compared"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(render_doc())
        print(f"wrote {DOC.relative_to(ROOT)}")
    else:
        print(render_doc(), end="")
