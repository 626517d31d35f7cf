"""Host-side cost of one GSPN2AttnProcessor call, measurable on CPU: aten ops launched and Python time.

    python benchmarks/profile_processor.py            # tiny layer (C 64, Cp 8, 8x8 grid): host cost only

The propagation op is replaced by a stub (it is counted and timed by benchmarks/bench_op.py), so the
numbers are the processor around it: every aten op that is not a view is one kernel launch on a GPU.
Three paths on the same layer: ``training`` (``mix`` + ``to_out``, what a gradient step runs),
``inference`` (no gradient) and ``inference, fused`` (after ``fuse_projections``). The last table is
torch.library's dispatch per call of a registered op against calling its implementation directly.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from unittest import mock

import torch
from diffusers.models.attention_processor import Attention
from torch.utils._python_dispatch import TorchDispatchMode

from gspn_diffusers import GSPN2AttnProcessor
from gspn_diffusers import processor as processor_module


class CountOps(TorchDispatchMode):
    """Counts the aten ops that are not views (each is a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def stub_propagate(x, gates, lam, u=None, *, chunk_size=None, backend="auto"):
    with torch.utils._python_dispatch._disable_current_modes():
        return x.new_empty(x.shape[0], 4, *x.shape[1:])


def paths(attn, processor, tokens):
    def training():
        return attn.to_out[1](attn.to_out[0](processor.mix(tokens, processor.grid)))

    def call():
        return processor(attn, tokens)

    return {"training (mix + to_out)": (training, False), "inference": (call, False), "inference, fused": (call, True)}


def microseconds(fn, calls: int) -> float:
    fn()
    samples = []
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - begin) / calls * 1e6)
    return statistics.median(samples)


def dispatch_overhead(calls: int) -> tuple[float, float]:
    """(us per call through a torch.library custom op, us calling the same function directly)."""

    def body(x: torch.Tensor, y: torch.Tensor | None, n: int, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return x.clone(), x.clone()

    op = torch.library.custom_op("gspn_profile::noop", body, mutates_args=(), device_types="cpu")
    x = torch.zeros(1)
    with torch.inference_mode():
        return microseconds(lambda: op(x, x, 1, False), calls), microseconds(lambda: body(x, x, 1, False), calls)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="C (SDXL: 640, 1280)")
    parser.add_argument("--proxy-ratio", type=int, default=8)
    parser.add_argument("--grid", type=int, nargs=2, default=(8, 8))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    attn = Attention(query_dim=args.width, heads=args.width // 64, dim_head=64).eval().requires_grad_(False)
    processor = GSPN2AttnProcessor.from_attention(attn, proxy_ratio=args.proxy_ratio).requires_grad_(False)
    processor.grid = tuple(args.grid)
    tokens = torch.randn(args.batch, args.grid[0] * args.grid[1], args.width)
    print(f"C {args.width}, Cp {processor.proxy_dim}, grid {tuple(args.grid)}, batch {args.batch}; op stubbed")
    print(f"{'path':>24} | {'aten ops':>8} | {'us/call':>8} | ops")
    # no_grad, not inference_mode: composite ops (linear, conv2d) then show as the ops they launch.
    with mock.patch.object(processor_module, "gspn_propagate", stub_propagate), torch.no_grad():
        for name, (fn, fused) in paths(attn, processor, tokens).items():
            processor.fuse_projections() if fused else processor.unfuse_projections()
            fn()
            with CountOps() as counter:
                fn()
            ops = ", ".join(f"{op} {n}" for op, n in sorted(counter.ops.items()))
            print(f"{name:>24} | {sum(counter.ops.values()):>8} | {microseconds(fn, args.calls):>8.1f} | {ops}")
    through_library, direct = dispatch_overhead(args.calls * 10)
    print(f"torch.library custom op call: {through_library:.1f} us; the function called directly: {direct:.1f} us")


if __name__ == "__main__":
    main()
