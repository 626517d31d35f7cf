"""``make demo``: GSPN SDXL's progressive, tiled generation on a machine with no weights and no GPU.

The tiny random SDXL of ``gspn_diffusers.testing`` (base resolution 256) with a fresh GSPN adapter
makes a 1024x1024 image, 4x its base: a 256 base stage (the UNet's own softmax attention) and two x2
stages (GSPN). The planner is told the machine has 32 MiB to work with, so the last stage runs the UNet
on blended tiles and the VAE decodes in tiles; the plan, the time per stage and the image (under
outputs/) are the demo. The weights are random, so the picture is noise: the mechanics are what runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline
from gspn_diffusers.testing import save_tiny_sdxl

SIZE = 1024
MEMORY_BUDGET = 32 * 2**20  # as if the machine had 32 MiB to spare: tiles in the last stage and the VAE
STEPS = 8
OUT = Path("outputs")

REAL_WEIGHTS = """
With real weights, on a GPU:

    import torch
    from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline

    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        gspn=GSPNAdapter.from_pretrained("path/or/hub-id/of/a/gspn/checkpoint"),
        torch_dtype=torch.float16).to("cuda")
    print(pipe.plan(height=16384, width=16384))
    image = pipe("a lighthouse at dawn", height=16384, width=16384).images[0]

or the script: python examples/generate_16k.py --model stabilityai/stable-diffusion-xl-base-1.0 --gspn PATH
(train a GSPN checkpoint with distill/distill_sdxl.py; without --model it times the full-size
architecture with random weights).
"""


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = save_tiny_sdxl(Path(folder) / "tiny_sdxl")
        stock = GSPNStableDiffusionXLPipeline.from_pretrained(path)
        pipe = GSPNStableDiffusionXLPipeline.from_pretrained(path, gspn=GSPNAdapter.for_unet(stock.unet))
    pipe.set_progress_bar_config(leave=False)

    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, memory_budget=MEMORY_BUDGET)
    print(f"tiny SDXL (random weights) + fresh GSPN adapter, base {pipe.base_size}, target {SIZE}x{SIZE}\n")
    print(pipe.plan(**kwargs), "\n")

    start = time.perf_counter()
    out = pipe("a lighthouse on a cliff at dawn", generator=torch.Generator().manual_seed(0), **kwargs)
    total = time.perf_counter() - start

    print(f"\n{'stage':>6}  {'size':>9}  {'steps':>5}  {'attention':>9}  {'tiles':>5}  {'seconds':>7}")
    for t in out.timings:
        size = f"{t['width']}x{t['height']}"
        print(f"{t['stage']!s:>6}  {size:>9}  {t.get('steps', ''):>5}  {t.get('attention', ''):>9}  {t['tiles']:>5}  "
              f"{t['seconds']:>7.2f}")
    OUT.mkdir(exist_ok=True)
    image_path = OUT / f"demo_{SIZE}x{SIZE}.png"
    out.images[0].save(image_path)
    print(f"total {total:.1f} s; image (random weights, so noise): {image_path}")
    print(REAL_WEIGHTS)


if __name__ == "__main__":
    main()
