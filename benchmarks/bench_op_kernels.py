"""Per-kernel GPU time of one training step of gspn_propagate's CUDA backend, from torch.profiler.

Prints one table: per case, the time of the forward scan (writing the float32 state), the adjoint scan
and the gradient pass of the backward, and of anything else the step launches (casts, memsets), in ms,
averaged over a few steps after a warm-up. The cases are bench_op.py's.

    python benchmarks/bench_op_kernels.py                 # all cases
    python benchmarks/bench_op_kernels.py --quick         # bench_op.py's short subset
"""

from __future__ import annotations

import argparse
import datetime
import re

import torch
from torch.profiler import ProfilerActivity, profile

from bench_op import CASES, QUICK, case_inputs, print_table
from gspn_diffusers.ops import gspn_propagate

STEPS = 3
COLUMNS = {  # kernel name prefix -> column
    "void gspn::rows_scan_kernel<": "scan",
    "void gspn::columns_scan_kernel<": "scan",
    "void gspn::scan_kernel<": "scan",
    "void gspn::gradients_kernel<": "gradient pass",
    "void gspn::taps_kernel<": "taps pass",
}
# The adjoint is the scan instantiated with kAdjoint = true: the second template argument of the
# line-parallel scans, the third of the generic one.
ADJOINT = re.compile(r"(?:rows|columns)_scan_kernel<[^,]+, (?:true|\(bool\)1)|\bscan_kernel<[^,]+, [^,]+, (?:true|\(bool\)1)")


def kernel_times(step) -> dict[str, float]:
    """Milliseconds per step by column: forward scan, adjoint scan, gradient pass, taps pass (forward and
    backward), other."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    times = {"forward scan": 0.0, "adjoint scan": 0.0, "gradient pass": 0.0, "taps pass": 0.0, "other": 0.0}
    for kernel in prof.key_averages():
        if kernel.device_type.name != "CUDA":  # CPU-side ops: their kernels are listed on their own
            continue
        column = next((c for prefix, c in COLUMNS.items() if kernel.key.startswith(prefix)), "other")
        if column == "scan":  # the adjoint is the scan instantiated with kAdjoint = true
            column = "adjoint scan" if ADJOINT.search(kernel.key) else "forward scan"
        times[column] += kernel.self_device_time_total / 1000 / STEPS
    return times


def training_step(batch, channels, groups, height, width, dtype, chunk, with_u):
    """A closure running one forward + backward of gspn_propagate on fresh random inputs."""
    inputs = [t.requires_grad_() for t in case_inputs(batch, channels, groups, height, width, dtype, with_u)
              if t is not None]
    grad_y = torch.randn(batch, 4, channels, height, width, device="cuda", dtype=dtype)

    def step():
        out = gspn_propagate(*inputs[:3], inputs[3] if with_u else None, chunk_size=chunk, backend="cuda")
        torch.autograd.grad(out, inputs, grad_y)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short subset of the cases")
    args = parser.parse_args()
    print(f"{datetime.date.today()} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for name, (batch, channels, groups, height, width), dtype, chunk, with_u in CASES:
        if args.quick and name not in QUICK:
            continue
        times = kernel_times(training_step(batch, channels, groups, height, width, dtype, chunk, with_u))
        rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""),
                     **{k: f"{v:.3f}" for k, v in times.items()}, "total": f"{sum(times.values()):.3f}"})
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
