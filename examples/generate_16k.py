"""Generate large images with GSPN SDXL; write each with a JSON of timings and peak memory per stage.

    # real weights: SDXL plus a GSPN checkpoint (paths or Hub ids)
    python examples/generate_16k.py --model stabilityai/stable-diffusion-xl-base-1.0 --gspn path/to/gspn

    # no weights: the full-size SDXL architecture with RANDOM weights, float16 on the GPU (timings only)
    python examples/generate_16k.py --height 16384 --width 16384

    # the same with SDXL's own softmax self-attention, for the speed ratio
    python examples/generate_16k.py --height 4096 --width 4096 --softmax

    # GSPN in every stage (default: softmax in the base stage, GSPN above), or one per stage
    python examples/generate_16k.py --height 4096 --width 4096 --stage-attention gspn
    python examples/generate_16k.py --height 4096 --width 4096 --stage-attention softmax,gspn,gspn

    # several sizes with one model build, timings only
    python examples/generate_16k.py --sizes 4096 8192 16384 --no-save-image

    # CPU smoke run with the tiny test SDXL
    python examples/generate_16k.py --tiny --height 1024 --width 1024 --steps 4

    # one image on 8 GPUs (the plan spreads CFG halves, tiles, VAE tiles and images; docs/multigpu.md)
    accelerate launch --num_processes 8 examples/generate_16k.py --height 16384 --width 16384

Without ``--gspn`` a folder saved with a ``gspn`` subfolder brings its adapter; otherwise a fresh,
untrained ``GSPNAdapter.for_unet`` is mounted (fine for timings, not for pictures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline
from gspn_diffusers.pipelines import distributed
from gspn_diffusers.pipelines.memory import (
    GIB as _GIB,
    SDXL_UNET_BYTES_PER_LATENT_PIXEL,
    SDXL_VAE_BYTES_PER_PIXEL,
    MemoryModel,
)
from gspn_diffusers.pipelines.planning import make_plan

GIB = _GIB
# Full-size SDXL UNet on a CPU: about 3 s per pass of a 128 x 128 latent (1024^2 image), float32.
CPU_SECONDS_PER_LATENT_PIXEL = 3.0 / 128**2
CPU_LIMIT_SECONDS = 180
NOISE_WARNING = """
########################################################################################
##  NO WEIGHTS: this is the SDXL architecture with RANDOM weights.                    ##
##  The image is NOISE. Only the timings and the memory figures are real.             ##
########################################################################################
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SDXL pipeline folder or Hub id (default: random full-size SDXL)")
    p.add_argument("--gspn", help="GSPNAdapter folder or Hub id (default: the model's own, else a fresh one)")
    p.add_argument("--softmax", action="store_true", help="keep SDXL's softmax self-attention (no GSPN)")
    p.add_argument("--stage-attention", type=parse_stage_attention, default=None, metavar="auto|gspn|softmax|A,B,...",
                   help="self-attention per stage: auto (default: softmax in the base stage, GSPN above), gspn or "
                        "softmax for every stage, or a comma list of one per stage")
    p.add_argument("--tiny", action="store_true", help="the tiny random test SDXL (CPU smoke runs)")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn, waves, gulls, highly detailed photograph")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=16384)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--sizes", nargs="+", metavar="WxH", type=parse_size, help="several sizes in one run (one model build), "
                   "e.g. 4096 8192 16384 or 3000x2000; overrides --height/--width")
    p.add_argument("--steps", type=int, default=30, help="base stage steps (upscale stages take a tail)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, help="UNet tile, pixels (default: from free memory)")
    p.add_argument("--vae-tile-size", type=int, help="VAE tile, pixels (default: from free memory)")
    p.add_argument("--memory-budget-gib", type=float, help="working memory to plan with (default: free memory)")
    p.add_argument("--device", help="default: this process's device under accelerate/torchrun, else cuda, else cpu")
    p.add_argument("--allow-slow-cpu", action="store_true",
                   help=f"run the full-size SDXL on a CPU even when that takes more than {CPU_LIMIT_SECONDS} s")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default: float16 on CUDA")
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up call at the base size")
    p.add_argument("--plan-only", action="store_true", help="print the plan and exit")
    p.add_argument("--no-save-image", action="store_true", help="write the JSON only (a 16K PNG is ~0.5 GB)")
    p.add_argument("--out", default="outputs/generate_16k", help="folder for the images and the JSONs")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1; got {args.steps}")
    for name in ("tile_size", "vae_tile_size", "memory_budget_gib"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive; got {value}")
    return args


def build_pipeline(args, device, dtype) -> tuple[GSPNStableDiffusionXLPipeline, bool]:
    """(pipeline on ``device`` with the attention asked for, whether its weights are random)."""
    random_weights = args.model is None
    if args.tiny:
        from gspn_diffusers.testing import random_sdxl_components

        # Built in place (no folder to write: under several processes only the main one would write it).
        pipe = GSPNStableDiffusionXLPipeline(**random_sdxl_components("tiny", device, dtype))
    elif args.model:
        try:
            pipe = GSPNStableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        except (OSError, ValueError, EnvironmentError) as error:
            raise ValueError(f"--model {args.model}: cannot load an SDXL pipeline from it "
                             f"({str(error).splitlines()[0]})") from None
    else:
        from gspn_diffusers.testing import random_sdxl_components

        pipe = GSPNStableDiffusionXLPipeline(**random_sdxl_components("full", device, dtype))

    if args.softmax:
        if pipe.gspn is not None:
            pipe.gspn.unmount(pipe.unet)
            pipe.register_modules(gspn=None)
        return pipe, random_weights
    if args.gspn:
        try:
            adapter = GSPNAdapter.from_pretrained(args.gspn)
        except (OSError, ValueError) as error:
            raise ValueError(f"--gspn {args.gspn}: cannot load a GSPNAdapter from it "
                             f"({str(error).splitlines()[0]})") from None
    elif pipe.gspn is not None:
        return pipe, random_weights
    else:
        if not random_weights:
            print("WARNING: no GSPN checkpoint given: mounting a fresh, untrained GSPNAdapter (timings only)")
        adapter = GSPNAdapter.for_unet(pipe.unet)
    if pipe.gspn is not None:
        pipe.gspn.unmount(pipe.unet)
    components = {**pipe.components, "gspn": adapter.to(device)}
    force_zeros = pipe.config.force_zeros_for_empty_prompt
    return GSPNStableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=force_zeros), random_weights


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def parse_stage_attention(text: str) -> str | list[str] | None:
    """'auto' -> None; 'gspn' / 'softmax' -> that for every stage; 'softmax,gspn' -> one per stage."""
    if text == "auto":
        return None
    values = text.split(",")
    if not all(v in ("gspn", "softmax") for v in values):
        raise argparse.ArgumentTypeError(f"must be auto, gspn, softmax or a comma list of gspn/softmax; got {text!r}")
    return values[0] if len(values) == 1 else values


def parse_size(text: str) -> tuple[int, int]:
    """'4096' -> (4096, 4096); '3000x2000' -> (height 2000, width 3000)."""
    parts = text.split("x")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be N or WxH with positive integers; got {text!r}")
    width, height = int(parts[0]), int(parts[-1])
    return height, width


def check_plan_inputs(args, sizes, device) -> None:
    """Plan every size with SDXL's memory model before a model is built: bad sizes fail in a line,
    and a full-size run on a CPU that would take more than CPU_LIMIT_SECONDS is refused unless asked."""
    memory = MemoryModel(SDXL_UNET_BYTES_PER_LATENT_PIXEL, 4, SDXL_VAE_BYTES_PER_PIXEL)
    base = 256 if args.tiny else 1024
    for height, width in sizes:
        plan = make_plan(height=height, width=width, base_size=base, vae_scale_factor=8, memory=memory,
                         memory_budget=1 << 62, num_inference_steps=args.steps, cfg=args.guidance_scale > 1,
                         tile_size=args.tile_size, vae_tile_size=args.vae_tile_size,
                         stage_attention=args.stage_attention, gspn_available=not args.softmax)
        if device.type != "cpu" or args.tiny or args.plan_only or args.allow_slow_cpu:
            continue
        passes = sum(s.steps * (2 if plan.cfg else 1) * s.latent_height * s.latent_width for s in plan.stages)
        seconds = passes * CPU_SECONDS_PER_LATENT_PIXEL
        if seconds > CPU_LIMIT_SECONDS:
            raise ValueError(
                f"no GPU: the full-size SDXL at {width}x{height} would take about {seconds / 60:.0f} min on this "
                "CPU; use --tiny for a smoke run, or --allow-slow-cpu to run it anyway")


def generate(pipe, args, height, width, attention, random_weights, out_dir: Path) -> dict:
    """One image: print the plan, run, print the stage table; write the PNG and the JSON report."""
    device = pipe._execution_device
    budget = None if args.memory_budget_gib is None else int(args.memory_budget_gib * GIB)
    call = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                tile_size=args.tile_size, vae_tile_size=args.vae_tile_size, memory_budget=budget,
                stage_attention=args.stage_attention)
    plan = pipe.plan(**call)
    main_process = distributed.is_main_process()
    if main_process:
        print(plan)
    if args.plan_only:
        return {}

    start = time.perf_counter()
    result = pipe(args.prompt, negative_prompt=args.negative_prompt,
                  generator=torch.Generator(device="cpu").manual_seed(args.seed), output_type="pil", **call)
    total = time.perf_counter() - start

    if not main_process:  # every process got the images; the main one reports and saves
        return {}
    name = f"{attention}_{width}x{height}"
    image_path, save_seconds = None, None
    if not args.no_save_image:
        image_path = out_dir / f"{name}.png"
        saving = time.perf_counter()
        result.images[0].save(image_path, compress_level=1)
        save_seconds = time.perf_counter() - saving

    print(f"\n{'stage':>6}  {'size (WxH)':>11}  {'steps':>5}  {'attention':>9}  {'tiles':>5}  {'CFG':>10}  "
          f"{'seconds':>8}  {'peak':>10}")
    for t in result.timings:
        cfg = "" if "cfg_sequential" not in t else ("sequential" if t["cfg_sequential"] else "batched")
        size = f"{t['width']}x{t['height']}"
        print(f"{t['stage']!s:>6}  {size:>11}  {t.get('steps', ''):>5}  {t.get('attention', ''):>9}  {t['tiles']:>5}  "
              f"{cfg:>10}  {t['seconds']:>8.2f}  {_gib(t['peak_bytes']):>10}")
    peaks = [t["peak_bytes"] for t in result.timings if t["peak_bytes"] is not None]
    peak = max(peaks) if peaks else None
    print(f"total {total:.2f} s (prompt encoding included), peak {_gib(peak)}"
          + ("" if image_path is None else f"; PNG {image_path} written in {save_seconds:.1f} s"))

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "processes": plan.num_processes,
        "torch": torch.__version__,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "attention": attention,
        "stage_attention": args.stage_attention or "auto",
        "weights": "random (the image is noise; timings are real)" if random_weights else args.model,
        "gspn": args.gspn,
        "height": height,
        "width": width,
        "steps": args.steps,
        "seed": args.seed,
        "plan": str(plan),
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "stages": [{k: list(v) if isinstance(v, tuple) else v for k, v in t.items()} for t in result.timings],
        "total_seconds": total,
        "peak_bytes": peak,
        "png_seconds": save_seconds,
        "image": None if image_path is None else str(image_path),
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"timings: {json_path}\n")
    return report


def default_device() -> torch.device:
    """This process's device under accelerate/torchrun (accelerate's PartialState), else cuda, else cpu."""
    if distributed.process()[1] > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None) -> list[dict]:
    """Build the pipeline once, then generate every size asked for; returns the reports (the main
    process's; the others return empty dicts). Under ``accelerate launch`` / ``torchrun`` every process
    runs this with the same arguments."""
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()  # started by accelerate/torchrun: join the process group
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    sizes = args.sizes or [(args.height, args.width)]
    if device.type == "cpu" and not args.tiny:
        say("no GPU: running on the CPU")
    check_plan_inputs(args, sizes, device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe, random_weights = build_pipeline(args, device, dtype)
    if random_weights:
        say(NOISE_WARNING)
    attention = "softmax" if args.softmax else "gspn"
    say(f"{attention} attention, {dtype}, {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                                        if device.type == "cuda" else "")
        + f", {distributed.process()[1]} process(es)")
    if not args.no_warmup and not args.plan_only and device.type == "cuda":
        say("warm-up: one step at the base size with each attention (kernel builds and autotuning stay out of "
            "the timings)")
        pipe.set_progress_bar_config(disable=True)
        for kind in ("softmax",) if args.softmax else ("softmax", "gspn"):
            pipe(args.prompt, num_inference_steps=1, output_type="latent", stage_attention=kind)
        pipe.set_progress_bar_config(disable=False)

    reports = [generate(pipe, args, height, width, attention, random_weights, out_dir) for height, width in sizes]
    if random_weights:
        say(NOISE_WARNING)
    return reports


def say(text: str) -> None:
    if distributed.is_main_process():
        print(text)


def cli(argv=None) -> int:
    """``main`` with user errors (bad sizes, models that do not load, plans that cannot run) as one
    line on stderr and exit status 2 instead of a traceback."""
    try:
        main(argv)
    except ValueError as error:
        print(f"generate_16k.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
