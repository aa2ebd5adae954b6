"""`threed run | export | bench | view`: the command line.

Options cover what people change every run; everything else is a `key=value` config override after the
options (e.g. `render.width=128 guidance.sd.guidance_scale=50`). Bad input ends with one line naming the
problem and the fix, and exit code 2 (130 after Ctrl-C), never a traceback. How options become a run's
config is threed/spec.py's job, shared with `threed bench`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from threed import priors
from threed.errors import UserError

EPILOG = "Config overrides: key=value after the options, e.g. render.width=128 optim.lr=0.005"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every other bad input
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Like argparse's, but a mistyped option names the nearest valid one."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = self._subparser_for(parsed)
            options = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
            for item in extra:
                if item.startswith("-"):
                    name = item.split("=", 1)[0]
                    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]}?" if close else ""
                    raise UserError(f"unknown option {name}{hint} (see `{sub.prog} --help`)")
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _subparser_for(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(getattr(parsed, "command", None), self)
        return self


def _add_model_options(p: argparse.ArgumentParser, bench: bool = False) -> None:
    """The options that choose the prior and its models, shared by `run` and `bench` (in a bench each goes
    to the methods whose prior it concerns): --guidance and each prior's options, from the prior registry."""
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--guidance", choices=priors.choices(),
                   help="the prior [the preset's or the method's]" if not bench else
                        "the prior of every method that takes it [each method's own]")
    helps: dict[str, list[str]] = {}  # an option several priors take (--model) is one flag
    for _, option in priors.options():
        helps.setdefault(option.name, []).append(option.help + (option.bench_help if bench else ""))
    for _, option in priors.options():
        if option.name in helps:
            p.add_argument(option.flag, dest=option.name, help="; ".join(helps.pop(option.name)))


def _add_run(sub: argparse._SubParsersAction) -> None:
    from threed import methods

    p = sub.add_parser("run", help="optimise a 3D asset from a text prompt (or a reference mesh)", epilog=EPILOG)
    p.add_argument("--prompt", help="text prompt, e.g. \"a yellow rubber duck\"")
    p.add_argument("--image", help="image-to-3D: the input image (RGBA PNG, or any image with pip install "
                                   "'threed[image]') [method zero123; --method dreamgaussian: dreamgaussian-image]")
    p.add_argument("--method", help=f"{', '.join(methods.names())} [from the preset or the prior; dreamfusion]")
    p.add_argument("--preset", help="a preset in configs/ or a .yaml file [the method's; its CPU preset "
                                    "where no CUDA GPU is visible]")
    _add_model_options(p)
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu or cuda [cuda if available]")
    p.add_argument("--out", help="run directory [outputs/<prompt>]")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--from", dest="from_run", metavar="DIR",
                   help="magic3d-refine: refine the NeRF of the run in DIR, in a new run [--out: DIR-refine]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--init-mesh", dest="init_mesh", metavar="PATH",
                   help="fantasia3d: start the surface from this guide mesh instead of a sphere (geometry.init.mesh); "
                        "dreamgaussian: start the Gaussians on this mesh's surface or .ply point cloud instead of a "
                        "ball (gaussians.init_mesh)")
    p.add_argument("--init-mesh-up", dest="init_mesh_up", choices=("+x", "+y", "+z", "-x", "-y", "-z"),
                   help="the guide mesh's up axis [+y]")
    p.add_argument("--init-mesh-front", dest="init_mesh_front", choices=("+x", "+y", "+z", "-x", "-y", "-z"),
                   help="the axis the guide mesh's front faces [+z]")
    p.add_argument("--env-map", dest="env_map", metavar="FILE.hdr",
                   help="fantasia3d: the environment lighting the material, a Radiance .hdr (appearance.env_map)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-export a run's mesh from its last checkpoint")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--format", default="obj,glb", help="obj, glb, ply or a comma-separated list [obj,glb]")
    p.add_argument("--resolution", type=int, help="marching-cubes grid per axis")
    p.add_argument("--threshold", type=float, help="density level (default: chosen automatically)")
    p.add_argument("--video", action="store_true", help="also render turntable.mp4 and preview.png")
    p.add_argument("--texture", action=argparse.BooleanOptionalAction, default=None,
                   help="OBJ and GLB with a baked albedo texture (UV atlas + PNG) instead of vertex colours "
                        "[the run's export.texture]")
    p.add_argument("--texture-size", dest="texture_size", type=int,
                   help="texture side in pixels (implies --texture) [the run's export.texture_size]")
    p.add_argument("--device", help="cpu or cuda")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare methods on the same prompts, seeds and budget",
                       epilog="Config overrides: key=value after the options for every method (a key of one prior's "
                              "section, e.g. guidance.sd.guidance_scale=50, for the methods using that prior), or "
                              "METHOD:key=value for one method, e.g. clip:render.width=96")
    from threed import bench

    bench.add_arguments(p)
    _add_model_options(p, bench=True)
    p.add_argument("--device", help="cpu or cuda [cuda if available]")
    p.add_argument("overrides", nargs="*", metavar="[METHOD:]key=value",
                   help="config overrides for every method, or METHOD:key=value for one")


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


def _starts_from_gaussians(args: argparse.Namespace) -> bool:
    """Whether the run's method (--method, else the preset's `method:`) starts from Gaussians (dreamgaussian)."""
    from threed import methods

    name = args.method
    if not name and args.preset:
        from threed.config import load_yaml, preset_path

        name = (load_yaml(preset_path(args.preset)) or {}).get("method")
    return bool(name) and any("gaussians" in stage.reads for stage in methods.get(str(name)).stages)


def _fantasia3d_options(args: argparse.Namespace) -> None:
    """--init-mesh, its axes and --env-map as overrides of the geometry and appearance sections (for a method
    that starts from Gaussians, --init-mesh and its axes as gaussians.init_mesh*), the files checked now (a
    missing, empty or unreadable one is one line) and kept as absolute paths for --resume."""
    given = {"geometry.init.mesh": args.init_mesh, "geometry.init.mesh_up": args.init_mesh_up,
             "geometry.init.mesh_front": args.init_mesh_front, "appearance.env_map": args.env_map}
    if (args.init_mesh or args.init_mesh_up or args.init_mesh_front) and _starts_from_gaussians(args):
        given = {"gaussians.init_mesh": args.init_mesh, "gaussians.init_mesh_up": args.init_mesh_up,
                 "gaussians.init_mesh_front": args.init_mesh_front, "appearance.env_map": args.env_map}
        if args.init_mesh:
            from threed.fields.gaussian_init import check_init_points

            check_init_points(args.init_mesh)
            given["gaussians.init_mesh"] = str(Path(args.init_mesh).resolve())
    elif args.init_mesh:
        from threed.fields.sdf_init import load_guide_mesh

        load_guide_mesh(args.init_mesh)
        given["geometry.init.mesh"] = str(Path(args.init_mesh).resolve())
    if args.env_map:
        from threed.render.hdr import read_hdr

        read_hdr(args.env_map)
        given["appearance.env_map"] = str(Path(args.env_map).resolve())
    args.overrides = [f"{k}={v}" for k, v in given.items() if v] + list(args.overrides or [])


def cmd_run(args: argparse.Namespace) -> None:
    from threed import pipeline, spec

    _fantasia3d_options(args)
    opts = spec.RunOptions.from_args(args)
    if args.resume:
        if args.from_run:
            raise UserError("--from starts a new run and --resume continues one: pass one of them")
        run_dir = Path(args.resume)
        saved = pipeline.load_run_config(run_dir)
        cfg = spec.resume_config(saved, opts)
        finished = pipeline.check_resume(run_dir, saved, cfg, steps_given=args.steps is not None)
        if finished:
            print(finished)
            return
        out = run_dir
        written = pipeline.run(cfg, run_dir, resume=True, progress=not args.quiet)
    elif args.from_run:
        cfg, notes, checkpoint = spec.resolve_refine(opts)
        for note in notes:
            print(f"threed: {note}", flush=True)
        out = Path(args.out) if args.out else pipeline.default_refine_dir(Path(args.from_run))
        if (out / "config.yaml").exists():
            raise UserError(f"{out} already holds a run: continue it with `threed run --resume {out}` "
                            "or pass another --out")
        if out.resolve() == Path(args.from_run).resolve():
            raise UserError("--out is the run being refined: pass another --out (default: DIR-refine)")
        written = pipeline.run(cfg, out, progress=not args.quiet, source_checkpoint=checkpoint)
    else:
        cfg, notes = spec.resolve(opts)
        for note in notes:
            print(f"threed: {note}", flush=True)
        if cfg.steps < 1:
            raise UserError(f"--steps {cfg.steps} would only export the untrained initial shape: pass --steps 1 or more")
        out = Path(args.out) if args.out else pipeline.default_out_dir(cfg)
        if (out / "config.yaml").exists():
            raise UserError(f"{out} already holds a run: continue it with `threed run --resume {out}` "
                            "or pass another --out")
        written = pipeline.run(cfg, out, progress=not args.quiet)
    reference = cfg.guidance.oracle.reference if cfg.guidance.type == "oracle" else None
    print(pipeline.written_summary(written, reference))
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
    if args.texture_size is not None:
        if not 16 <= args.texture_size <= 16384:
            raise UserError(f"--texture-size {args.texture_size} is out of range: pass 16 to 16384 (e.g. 1024)")
        if args.texture is False:
            raise UserError("--texture-size sets the baked texture, but --no-texture asks for none: drop one")
    texture = True if args.texture_size is not None and args.texture is None else args.texture
    written = pipeline.export_run(run_dir, formats, args.resolution, args.threshold, video=args.video,
                                  device=args.device, texture=texture, texture_size=args.texture_size)
    cfg = pipeline.load_run_config(run_dir)
    print(pipeline.written_summary(written, cfg.guidance.oracle.reference if cfg.guidance.type == "oracle" else None))


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
