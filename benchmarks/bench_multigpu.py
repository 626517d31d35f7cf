"""Seconds per stage and in total, speed-up, efficiency and peak memory per GPU of GSPN SDXL generation
on 1..N GPUs (full-size SDXL architecture, random weights, float16).

Every process runs the script (torchrun or accelerate launch); each run writes
``multigpu_<N>gpu.json`` into ``--out``; ``--table`` prints the table of all runs found there, with
speed-up and efficiency against the 1-GPU run:

    for n in 1 2 4 8; do
        torchrun --nproc_per_node $n benchmarks/bench_multigpu.py --sizes 4096 8192 16384 --out results/
    done
    python benchmarks/bench_multigpu.py --table results/
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

GIB = 1024**3
ATTENTION_LETTERS = {"softmax": "s", "gspn": "g"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192, 16384], help="square sizes, pixels")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="outputs/bench_multigpu", help="folder of the JSON results")
    p.add_argument("--tiny", action="store_true", help="the tiny test SDXL (a CPU check of the script)")
    p.add_argument("--table", metavar="FOLDER", help="print the table of the runs in FOLDER and exit")
    return p.parse_args(argv)


def build(tiny: bool, device: torch.device):
    from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline
    from gspn_diffusers.testing import random_sdxl_components

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = GSPNStableDiffusionXLPipeline(**random_sdxl_components("tiny" if tiny else "full", device, dtype))
    adapter = GSPNAdapter.for_unet(pipe.unet).to(device=device, dtype=dtype)
    return GSPNStableDiffusionXLPipeline(**{**pipe.components, "gspn": adapter})


def run(args) -> dict:
    from accelerate import PartialState

    from gspn_diffusers.pipelines import distributed

    state = PartialState()
    device = state.device
    pipe = build(args.tiny, device)
    pipe.set_progress_bar_config(disable=True)
    rank, world = distributed.process()
    for attention in ("softmax", "gspn"):  # kernel builds stay out of the timings
        pipe("warm-up", num_inference_steps=1, output_type="latent", stage_attention=attention)
    results = []
    for size in args.sizes:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = pipe("a lighthouse on a cliff at dawn", height=size, width=size, num_inference_steps=args.steps,
                   generator=torch.Generator().manual_seed(0), output_type="pt")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0],
                            device=device, dtype=torch.float64)
        peaks = [torch.zeros_like(peak) for _ in range(world)]
        if world > 1:
            torch.distributed.all_gather(peaks, peak)
        else:
            peaks = [peak]
        results.append({"size": size, "total_seconds": total,
                        "stages": [{"stage": t["stage"], "attention": t.get("attention"), "seconds": t["seconds"]}
                                   for t in out.timings],
                        "peak_bytes_per_gpu": [int(p.item()) for p in peaks], "plan": str(out.plan)})
        if rank == 0:
            print(out.plan)
            print(f"{size}: {total:.2f} s on {world} GPU(s), peak {max(results[-1]['peak_bytes_per_gpu']) / GIB:.2f} "
                  "GiB per GPU; stages: " + ", ".join(
                      f"{t['stage']} {t['attention'] + ' ' if 'attention' in t else ''}{t['seconds']:.2f} s"
                      for t in out.timings), flush=True)
    report = {"gpus": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": args.steps, "runs": results}
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"multigpu_{world}gpu.json").write_text(json.dumps(report, indent=2))
    return report


def table(folder: str) -> str:
    """Size, GPUs, seconds per stage, the attention of each stage, total, speed-up and efficiency against
    1 GPU, peak per GPU."""
    reports = sorted((json.loads(p.read_text()) for p in Path(folder).glob("multigpu_*gpu.json")),
                     key=lambda r: r["gpus"])
    one = {r["size"]: r["total_seconds"] for rep in reports if rep["gpus"] == 1 for r in rep["runs"]}
    lines = [f"{'size':>6} {'GPUs':>4}  {'seconds per stage (0, 1, ..., decode)':<44} {'attention':<9} {'total':>7} "
             f"{'speed-up':>8} {'effic.':>6} {'peak/GPU':>9}"]
    for size in sorted({r["size"] for rep in reports for r in rep["runs"]}):
        for rep in reports:
            for r in rep["runs"]:
                if r["size"] != size:
                    continue
                stages = ", ".join(f"{s['seconds']:.1f}" for s in r["stages"])
                attention = "".join(ATTENTION_LETTERS.get(s.get("attention"), "") for s in r["stages"]) or "-"
                base = one.get(size)
                speedup = "-" if base is None else f"{base / r['total_seconds']:.2f}x"
                efficiency = "-" if base is None else f"{base / r['total_seconds'] / rep['gpus']:.0%}"
                lines.append(f"{size:>6} {rep['gpus']:>4}  {stages:<44} {attention:<9} {r['total_seconds']:>7.2f} "
                             f"{speedup:>8} {efficiency:>6} {max(r['peak_bytes_per_gpu']) / GIB:>7.2f} G")
    lines.append("attention of each stage: s softmax, g GSPN")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args)


if __name__ == "__main__":
    main()
