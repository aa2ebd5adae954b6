"""`threed run | export | bench | view`: the command line.

Options cover what people change every run; everything else is a `key=value` config override after the
options (e.g. `render.width=128 guidance.guidance_scale=50`). Bad input ends with one line naming the
problem and the fix, and exit code 2 (130 after Ctrl-C), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from threed.errors import UserError

EPILOG = "Config overrides: key=value after the options, e.g. render.width=128 optim.lr=0.005"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="optimise a 3D asset from a text prompt (or a reference mesh)", epilog=EPILOG)
    p.add_argument("--prompt", help="text prompt, e.g. \"a yellow rubber duck\"")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--method", help="dreamfusion (alias sds) or clip [dreamfusion]")
    p.add_argument("--preset", help="a preset in configs/ (dreamfusion-sd, cpu-tiny, oracle, clip) or a .yaml file")
    p.add_argument("--model", help="Stable Diffusion: hub id or local diffusers folder")
    p.add_argument("--guidance", choices=["stable_diffusion", "sd", "oracle", "clip"], help="the prior")
    p.add_argument("--reference", help="reference mesh for --guidance oracle (OBJ/PLY/GLB, scene coordinates)")
    p.add_argument("--clip-model", dest="clip_model", help="open_clip architecture(s), comma-separated")
    p.add_argument("--clip-pretrained", dest="clip_pretrained", help="tag | checkpoint path | none, comma-separated")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu or cuda [cuda if available]")
    p.add_argument("--out", help="run directory [outputs/<prompt>]")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-export a run's mesh from its last checkpoint")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--format", default="obj,glb", help="obj, glb, ply or a comma-separated list [obj,glb]")
    p.add_argument("--resolution", type=int, help="marching-cubes grid per axis")
    p.add_argument("--threshold", type=float, help="density level (default: chosen automatically)")
    p.add_argument("--video", action="store_true", help="also render turntable.mp4 and preview.png")
    p.add_argument("--device", help="cpu or cuda")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare methods on the same prompts, seeds and budget", epilog=EPILOG)
    from threed import bench

    bench.add_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="serve a run or bench folder's report.html on 127.0.0.1 and print its URL")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--port", type=int, help="port [8000, or a free one if taken; 0: any free port]")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="threed", description="Text-to-3D by optimisation.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_view(sub)
    return p


def run_config(args: argparse.Namespace):
    """The run's Config from preset + options + overrides (options are overrides with friendly names)."""
    from threed.config import build_config
    from threed.methods import canonical, default_preset

    guidance = {"sd": "stable_diffusion"}.get(args.guidance, args.guidance)
    method = canonical(args.method) if args.method else ("clip" if guidance == "clip" else "dreamfusion")
    preset = args.preset or ("oracle" if guidance == "oracle" else default_preset(method))
    overrides = [f"method={method}"]
    if guidance:
        overrides.append(f"guidance.type={guidance}")
    quoted = lambda v: "'" + v.replace("'", "''") + "'"  # noqa: E731  (a YAML string, whatever it holds)
    for opt, key in [("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("model", "guidance.model"),
                     ("reference", "guidance.reference")]:
        value = getattr(args, opt)
        if value is not None:
            overrides.append(f"{key}={quoted(value)}")
    for opt, key in [("clip_model", "guidance.clip_models"), ("clip_pretrained", "guidance.clip_pretrained")]:
        value = getattr(args, opt)
        if value is not None:
            overrides.append(f"{key}=[{', '.join(quoted(v.strip()) for v in value.split(','))}]")
    for opt, key in [("steps", "steps"), ("seed", "seed"), ("device", "device")]:
        if getattr(args, opt) is not None:
            overrides.append(f"{key}={getattr(args, opt)}")
    cfg = build_config(preset, overrides + list(args.overrides))
    if cfg.guidance.reference:
        cfg.guidance.reference = os.path.abspath(os.path.expanduser(cfg.guidance.reference))
    return cfg


def cmd_run(args: argparse.Namespace) -> None:
    from threed import pipeline

    if args.resume:
        run_dir = Path(args.resume)
        extra = [f"steps={args.steps}"] if args.steps is not None else []
        if args.device:
            extra.append(f"device={args.device}")
        cfg = pipeline.load_run_config(run_dir, extra + list(args.overrides))
        pipeline.latest_checkpoint(run_dir)
        out = pipeline.run(cfg, run_dir, resume=True, progress=not args.quiet)
    else:
        cfg = run_config(args)
        out = Path(args.out) if args.out else pipeline.default_out_dir(cfg)
        if (out / "config.yaml").exists():
            raise UserError(f"{out} already holds a run: continue it with `threed run --resume {out}` "
                            "or pass another --out")
        out = pipeline.run(cfg, out, progress=not args.quiet)
    print(f"threed: done: {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from threed import pipeline

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: pass the --out folder of a `threed run`")
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    for fmt in formats:
        if fmt not in ("obj", "glb", "ply"):
            raise UserError(f"unknown export format '{fmt}': use obj, glb or ply")
    if args.resolution is not None and args.resolution < 8:
        raise UserError("--resolution must be at least 8")
    written = pipeline.export_run(run_dir, formats, args.resolution, args.threshold, video=args.video,
                                  device=args.device)
    for path in written:
        print(path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.command == "run":
            cmd_run(args)
        elif args.command == "export":
            cmd_export(args)
        elif args.command == "view":
            from threed import report

            report.view(args.dir, args.port)
        else:
            from threed import bench

            bench.main(args)
    except UserError as e:
        print(f"threed: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("threed: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
