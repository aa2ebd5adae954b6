"""The prior registry (threed/priors.py) is the one table: the command line, the config's guidance sections and
the run specification's options all come from it, and every guidance is built the same way, (cfg, device).
Fast: no model is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from dataclasses import dataclass

import pytest

from threed import cli, config, methods, priors, spec
from threed.config import Config, GuidanceConfig


def subparser(name: str) -> argparse.ArgumentParser:
    for action in cli.parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def registry_options() -> dict[str, tuple[str, str, bool]]:
    out: dict[str, tuple[str, str, bool]] = {}
    for p, o in priors.options():  # an option several priors take (--model) concerns its first
        out.setdefault(o.name, (p.key(o), p.name, o.is_list))
    return out


@pytest.mark.parametrize("command", ["run", "bench"])
def test_the_command_line_takes_the_registry_priors_and_options(command):
    parser = subparser(command)
    assert option(parser, "--guidance").choices == ["stable_diffusion", "sd", "oracle", "clip", "mvdream",
                                                     "zero123"] == priors.choices()
    for prior, opt in priors.options():
        action = option(parser, opt.flag)
        assert action.dest == opt.name and opt.help + (opt.bench_help if command == "bench" else "") in action.help


def test_a_registered_prior_reaches_the_command_line(monkeypatch):
    """Adding a row to the table is all it takes for `run` and `bench` to offer the prior and its options."""

    @dataclass
    class DummySettings:
        size: int = 1

    dummy = priors.Prior("dummy", "dummy", DummySettings, lambda cfg, device: None, aliases=("dm",),
                         options=(priors.Option("dummy_size", "size", "how big"),))
    monkeypatch.setitem(priors.PRIORS, "dummy", dummy)
    for command in ("run", "bench"):
        parser = subparser(command)
        assert option(parser, "--guidance").choices[-2:] == ["dummy", "dm"]
        assert option(parser, "--dummy-size").help.startswith("how big")
    assert priors.aliases()["dm"] == "dummy" and priors.sections()["dummy"] is DummySettings


def test_the_config_sections_and_prior_names_are_the_registry_s():
    fields = {f.name: f for f in dataclasses.fields(GuidanceConfig)}
    sections = priors.sections()
    assert list(sections) == ["sd", "oracle", "clip", "mvdream", "zero123", "vsd", "multiview"]
    assert [name for name in fields if name in sections] == list(sections)  # after the shared settings, in order
    defaults = GuidanceConfig()
    for section, settings in sections.items():
        assert typing.get_type_hints(GuidanceConfig)[section] is settings
        assert getattr(defaults, section) == settings()
    assert typing.get_args(typing.get_type_hints(GuidanceConfig)["type"]) == tuple(priors.PRIORS)
    assert defaults.type == priors.default_prior() == "stable_diffusion"
    assert config.PRIOR_SECTIONS == {p.name: p.section for p in priors.PRIORS.values()}
    assert config.METHOD_SECTIONS == {"vsd": "prolificdreamer", "multiview": "mvdream"}
    assert {s.method for s in priors.METHOD_SECTIONS.values()} <= set(methods.METHODS)
    assert methods.get("prolificdreamer").sections == ("vsd",)


def test_the_run_specification_s_options_are_the_registry_s():
    assert spec.PRIORS == tuple(priors.PRIORS) and spec.PRIOR_ALIASES == {"sd": "stable_diffusion"}
    concerning = {name: tuple(o[:3]) for name, o in spec.OPTIONS.items() if o.prior is not None}
    assert concerning == registry_options()
    assert concerning == {"model": ("guidance.sd.model", "stable_diffusion", False),
                          "reference": ("guidance.oracle.reference", "oracle", False),
                          "clip_model": ("guidance.clip.models", "clip", True),
                          "clip_pretrained": ("guidance.clip.pretrained", "clip", True)}
    assert spec.SHARED_KEYS == {"model": {"stable_diffusion": "guidance.sd.model", "mvdream": "guidance.mvdream.model",
                                          "zero123": "guidance.zero123.model"}}
    assert {f.name for f in dataclasses.fields(spec.RunOptions)} >= set(registry_options())
    every_key = set(config.all_keys())
    assert all(key in every_key for key, _, _ in registry_options().values())


def builders() -> list:
    return [p.build for p in priors.PRIORS.values()] + [s.build for s in priors.METHOD_SECTIONS.values()]


@pytest.mark.parametrize("build", builders(), ids=lambda b: b.__name__)
def test_every_builder_takes_the_run_config_and_a_device(build):
    assert list(inspect.signature(build).parameters) == ["cfg", "device"]


def test_every_guidance_takes_the_run_config_and_a_device():
    from threed.guidance.clip import ClipGuidance
    from threed.guidance.oracle import OracleGuidance
    from threed.guidance.stable_diffusion import StableDiffusionGuidance
    from threed.guidance.vsd import OracleVSD, StableDiffusionVSD, build_vsd
    from threed.guidance.zero123 import Zero123Guidance

    for guidance in (StableDiffusionGuidance, ClipGuidance, OracleGuidance, StableDiffusionVSD, OracleVSD,
                     Zero123Guidance):
        assert list(inspect.signature(guidance.__init__).parameters) == ["self", "cfg", "device"], guidance
    assert list(inspect.signature(build_vsd).parameters) == ["cfg", "device"]


def test_a_method_builds_its_guidance_through_the_registry(monkeypatch):
    """A method's own section's builder where it has one (prolificdreamer: vsd), else the prior's."""
    built = []

    def recorder(what: str):
        return lambda cfg, device: built.append((what, cfg.guidance.type, device)) or what

    for name, prior in list(priors.PRIORS.items()):
        monkeypatch.setitem(priors.PRIORS, name, dataclasses.replace(prior, build=recorder(name)))
    monkeypatch.setitem(priors.METHOD_SECTIONS, "vsd", dataclasses.replace(priors.METHOD_SECTIONS["vsd"],
                                                                           build=recorder("vsd")))
    oracle = Config(guidance=GuidanceConfig(type="oracle"))
    assert methods.get("dreamfusion").build_guidance(Config(), "cpu") == "stable_diffusion"
    assert methods.get("magic3d").build_guidance(oracle, "cpu") == "oracle"
    assert methods.get("clip").build_guidance(Config(guidance=GuidanceConfig(type="clip")), "cpu") == "clip"
    assert methods.get("prolificdreamer").build_guidance(oracle, "cuda") == "vsd"
    assert built[-1] == ("vsd", "oracle", "cuda")
