"""Generate large images with GSPN SDXL; write each with a JSON of timings and peak memory per stage.

    # real weights: SDXL plus a GSPN checkpoint (paths or Hub ids)
    python examples/generate_16k.py --model stabilityai/stable-diffusion-xl-base-1.0 --gspn path/to/gspn

    # no weights: the full-size SDXL architecture with RANDOM weights, float16 on the GPU (timings only)
    python examples/generate_16k.py --height 16384 --width 16384

    # the same with SDXL's own softmax self-attention, for the speed ratio
    python examples/generate_16k.py --height 4096 --width 4096 --softmax

    # several sizes with one model build, timings only
    python examples/generate_16k.py --sizes 4096 8192 16384 --no-save-image

    # CPU smoke run with the tiny test SDXL
    python examples/generate_16k.py --tiny --height 1024 --width 1024 --steps 4

Without ``--gspn`` a folder saved with a ``gspn`` subfolder brings its adapter; otherwise a fresh,
untrained ``GSPNAdapter.for_unet`` is mounted (fine for timings, not for pictures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch

from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline

GIB = 1024**3
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
    p.add_argument("--tiny", action="store_true", help="the tiny random test SDXL (CPU smoke runs)")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn, waves, gulls, highly detailed photograph")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=16384)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--sizes", nargs="+", metavar="WxH", help="several sizes in one run (one model build), "
                   "e.g. 4096 8192 16384 or 3000x2000; overrides --height/--width")
    p.add_argument("--steps", type=int, default=30, help="base stage steps (upscale stages take a tail)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, help="UNet tile, pixels (default: from free memory)")
    p.add_argument("--vae-tile-size", type=int, help="VAE tile, pixels (default: from free memory)")
    p.add_argument("--memory-budget-gib", type=float, help="working memory to plan with (default: free memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default: float16 on CUDA")
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up call at the base size")
    p.add_argument("--plan-only", action="store_true", help="print the plan and exit")
    p.add_argument("--no-save-image", action="store_true", help="write the JSON only (a 16K PNG is ~0.5 GB)")
    p.add_argument("--out", default="outputs/generate_16k", help="folder for the images and the JSONs")
    return p.parse_args(argv)


def build_pipeline(args, device, dtype, workdir: Path) -> tuple[GSPNStableDiffusionXLPipeline, bool]:
    """(pipeline on ``device`` with the attention asked for, whether its weights are random)."""
    random_weights = args.model is None
    if args.tiny:
        from gspn_diffusers.testing import save_tiny_sdxl

        pipe = GSPNStableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl(workdir / "tiny_sdxl"))
        pipe.to(device=device, dtype=dtype)
    elif args.model:
        pipe = GSPNStableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    else:
        from gspn_diffusers.testing import random_sdxl_components

        pipe = GSPNStableDiffusionXLPipeline(**random_sdxl_components("full", device, dtype))

    if args.softmax:
        if pipe.gspn is not None:
            pipe.gspn.unmount(pipe.unet)
            pipe.register_modules(gspn=None)
        return pipe, random_weights
    if args.gspn:
        adapter = GSPNAdapter.from_pretrained(args.gspn)
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


def parse_size(text: str) -> tuple[int, int]:
    """'4096' -> (4096, 4096); '3000x2000' -> (height 2000, width 3000)."""
    width, _, height = text.partition("x")
    return int(height or width), int(width)


def generate(pipe, args, height, width, attention, random_weights, out_dir: Path) -> dict:
    """One image: print the plan, run, print the stage table; write the PNG and the JSON report."""
    device = pipe._execution_device
    budget = None if args.memory_budget_gib is None else int(args.memory_budget_gib * GIB)
    call = dict(height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                tile_size=args.tile_size, vae_tile_size=args.vae_tile_size, memory_budget=budget)
    plan = pipe.plan(**call)
    print(plan)
    if args.plan_only:
        return {}

    start = time.perf_counter()
    result = pipe(args.prompt, negative_prompt=args.negative_prompt,
                  generator=torch.Generator(device="cpu").manual_seed(args.seed), output_type="pil", **call)
    total = time.perf_counter() - start

    name = f"{attention}_{width}x{height}"
    image_path, save_seconds = None, None
    if not args.no_save_image:
        image_path = out_dir / f"{name}.png"
        saving = time.perf_counter()
        result.images[0].save(image_path, compress_level=1)
        save_seconds = time.perf_counter() - saving

    print(f"\n{'stage':>6}  {'size (WxH)':>11}  {'steps':>5}  {'tiles':>5}  {'CFG':>10}  {'seconds':>8}  {'peak':>10}")
    for t in result.timings:
        cfg = "" if "cfg_sequential" not in t else ("sequential" if t["cfg_sequential"] else "batched")
        size = f"{t['width']}x{t['height']}"
        print(f"{t['stage']!s:>6}  {size:>11}  {t.get('steps', ''):>5}  {t['tiles']:>5}  "
              f"{cfg:>10}  {t['seconds']:>8.2f}  {_gib(t['peak_bytes']):>10}")
    peaks = [t["peak_bytes"] for t in result.timings if t["peak_bytes"] is not None]
    peak = max(peaks) if peaks else None
    print(f"total {total:.2f} s (prompt encoding included), peak {_gib(peak)}"
          + ("" if image_path is None else f"; PNG {image_path} written in {save_seconds:.1f} s"))

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "attention": attention,
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


def main(argv=None) -> list[dict]:
    """Build the pipeline once, then generate every size asked for; returns the reports."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else [(args.height, args.width)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as workdir:
        pipe, random_weights = build_pipeline(args, device, dtype, Path(workdir))
    if random_weights:
        print(NOISE_WARNING)
    attention = "softmax" if args.softmax else "gspn"
    print(f"{attention} attention, {dtype}, {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                                          if device.type == "cuda" else ""))
    if not args.no_warmup and not args.plan_only and device.type == "cuda":
        print("warm-up: one step at the base size (kernel builds and autotuning stay out of the timings)")
        pipe.set_progress_bar_config(disable=True)
        pipe(args.prompt, num_inference_steps=1, output_type="latent")
        pipe.set_progress_bar_config(disable=False)

    reports = [generate(pipe, args, height, width, attention, random_weights, out_dir) for height, width in sizes]
    if random_weights:
        print(NOISE_WARNING)
    return reports


if __name__ == "__main__":
    main()
