"""Floors of the Stable Diffusion guidance, eager and compiled: what one SDS step costs without a field.

    python examples/benchmark_guidance.py --model DIR --tiny-vae DIR --json guidance.json
    python examples/benchmark_guidance.py --models DIR          # DIR/sd and DIR/taesd (benchmark_step.py --build-models)
    python examples/benchmark_guidance.py --tiny-sd --device cpu --backend aot_eager --iters 2   # CPU smoke

Times, each as the median over --iters calls after --warmup, the host waiting for the GPU after each call:
- unet_cfg2: the UNet on the classifier-free-guidance batch of 2 (64² latents for SD at 512), no graph;
- vae_encode_backward: the 64² render upsampled to 512, encoded, and the backward to the render;
- sds_step: the whole guidance call (upsample, encode, noise, UNet CFG-2, SDS loss) and its backward;
- tiny_vae_encode_backward: the same through the tiny autoencoder (TAESD architecture), if given.
"eager" runs the networks as they are; "compiled" with threed's defaults on CUDA (the UNet under CUDA graphs,
the encoder without; threed/guidance/compile.py), compile time reported apart. With --vae-cudagraphs the
encoder is also timed under CUDA graphs (reduce-overhead), which threed does not use by default.
The compiled functions are the guidance's own, so a run of benchmark_step.py before this one has
filled the compile cache for them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, iters: int, warmup: int, device: str) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def peak_mb(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SD folder (default: DIR/sd of --models, else random SD-2.1-base built here)")
    p.add_argument("--tiny-vae", help="AutoencoderTiny folder (default: DIR/taesd of --models)")
    p.add_argument("--models", help="a folder made by benchmark_step.py --build-models")
    p.add_argument("--tiny-sd", action="store_true", help="tiny random SD and tiny autoencoder (CPU smoke test)")
    p.add_argument("--resolution", type=int, default=512, help="the encoder's input size (guidance.sd.resolution)")
    p.add_argument("--render", type=int, default=64, help="render size (the preset's 64)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: CPU plumbing check)")
    p.add_argument("--skip", default="", help="comma-separated: eager, compiled, tiny")
    p.add_argument("--vae-cudagraphs", action="store_true", help="also time the encoder under reduce-overhead")
    p.add_argument("--json")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from threed.cameras import make_cameras
    from threed.config import Config, GuidanceConfig, SDConfig, resolve_device
    from threed.guidance import compile as compiling
    from threed.guidance.stable_diffusion import StableDiffusionGuidance

    compiling.BACKEND = args.backend
    device = resolve_device(args.device)
    tmp = tempfile.TemporaryDirectory()
    model, tiny_vae = args.model, args.tiny_vae
    if args.models:
        model = model or str(Path(args.models) / "sd")
        tiny_vae = tiny_vae or str(Path(args.models) / "taesd")
    if args.tiny_sd:
        from threed.random_models import build_tiny_sd, build_tiny_taesd

        model = model or str(build_tiny_sd(Path(tmp.name) / "sd"))
        tiny_vae = tiny_vae or str(build_tiny_taesd(Path(tmp.name) / "taesd"))
    elif model is None:
        from threed.random_models import build_random_sd

        model = str(build_random_sd(HERE / "sd21-base-architecture", Path(tmp.name) / "sd", device=device))

    cams = make_cameras(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([1.75]), torch.tensor([55.0]),
                        args.render, args.render).to(device)
    gen = torch.Generator(device).manual_seed(0)
    rgb = torch.rand(1, args.render, args.render, 3, generator=gen, device=device)
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU", "torch": torch.__version__,
                    "render": args.render, "resolution": args.resolution, "backend": args.backend,
                    "iters": args.iters, "warmup": args.warmup, "eager": {}, "compiled": {}, "compile_s": {}}

    def measure_all(g: StableDiffusionGuidance, into: dict, prefix: str = "") -> None:
        """UNet, encoder + backward, whole SDS step + backward, on guidance `g` as it is configured."""
        with torch.no_grad():  # eagerly: a compiled encoder would compile again for no-grad mode
            z = g._encode_eager(rgb).float()
        t = torch.tensor([500], device=device)
        cond, uncond = g.prompts.for_cameras(cams)
        noisy = torch.randn(z.shape, generator=gen, device=device)

        def unet() -> None:
            if g.cudagraphs:
                compiling.new_iteration()
            g.noise_prediction(noisy, t, cond, uncond)

        def encode_backward() -> None:
            if g.cudagraphs:
                compiling.new_iteration()
            x = rgb.detach().requires_grad_(True)
            latents = g.encode_images(x)
            latents.backward(torch.ones_like(latents))

        def sds_step() -> None:
            x = rgb.detach().requires_grad_(True)
            g(x, cams, 0)["loss"].backward()

        if not prefix:
            into["unet_cfg2"] = median_ms(unet, args.iters, args.warmup, device)
        into[f"{prefix}vae_encode_backward"] = median_ms(encode_backward, args.iters, args.warmup, device)
        if not prefix:
            into["sds_step"] = median_ms(sds_step, args.iters, args.warmup, device)
            into["sds_step"]["peak_mb"] = peak_mb(sds_step, device)

    def guidance(**sd) -> StableDiffusionGuidance:
        cfg = GuidanceConfig(sd=SDConfig(model=model, resolution=args.resolution, **sd))
        return StableDiffusionGuidance(Config(guidance=cfg, prompt="a yellow rubber duck"), device)

    def compile_parts(g: StableDiffusionGuidance, unet_mode: str, vae_mode: str) -> dict:
        """Compile g's networks now (their first calls), returning the compile times."""
        g._encode = compiling.maybe_compile(g._encode_eager, vae_mode, "VAE encoder", differentiable=True)
        g._noise = compiling.maybe_compile(g._noise_eager, unet_mode, "UNet")
        g.cudagraphs = any(compiling.uses_cudagraphs(m) for m in (unet_mode, vae_mode))
        x = rgb.detach().requires_grad_(True)
        if g.cudagraphs:
            compiling.new_iteration()
        g(x, cams, 0)["loss"].backward()
        return {fn.name: (round(fn.seconds, 2) if fn.seconds else None) if fn.active else f"eager: {fn.error}"
                for fn in (g._encode, g._noise) if isinstance(fn, compiling.CompiledFunction)}

    g = guidance(compile="none", compile_vae="none")
    if "eager" not in skip:
        measure_all(g, result["eager"])
    if "compiled" not in skip:
        on = device == "cuda" or args.backend != "inductor"
        unet_mode, vae_mode = ("reduce-overhead", "default") if on else ("none", "none")
        result["compile_s"].update(compile_parts(g, unet_mode, vae_mode))
        measure_all(g, result["compiled"])
        if args.vae_cudagraphs and on:
            g2 = guidance(compile="none", compile_vae="none")
            result["compile_s"]["VAE encoder (reduce-overhead)"] = compile_parts(g2, "none", "reduce-overhead")
            measure_all(g2, result["compiled"], prefix="cudagraphs_")
            del g2
    del g
    if tiny_vae and "tiny" not in skip:
        gt = guidance(compile="none", compile_vae="none", vae="tiny", tiny_vae_model=tiny_vae)
        result["eager"]["tiny_vae_encode_backward"] = measure_all_tiny(gt, rgb, args, device, compiling)
        on = device == "cuda" or args.backend != "inductor"
        if "compiled" not in skip and on:
            gt._encode = compiling.maybe_compile(gt._encode_eager, "default", "tiny VAE encoder", differentiable=True)
            result["compiled"]["tiny_vae_encode_backward"] = measure_all_tiny(gt, rgb, args, device, compiling)
            fn = gt._encode
            result["compile_s"]["tiny VAE encoder"] = round(fn.seconds, 2) if fn.active and fn.seconds else f"eager: {fn.error}"
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    tmp.cleanup()


def measure_all_tiny(g, rgb, args, device, compiling) -> dict:
    def encode_backward() -> None:
        x = rgb.detach().requires_grad_(True)
        latents = g.encode_images(x)
        latents.backward(torch.ones_like(latents))

    encode_backward()  # compiles, where compiled: kept out of the timing
    return median_ms(encode_backward, args.iters, args.warmup, device)


if __name__ == "__main__":
    main()
