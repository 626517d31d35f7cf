"""Benchmark of gspn_propagate's CUDA kernels against the device's copy bandwidth and the reference.

Prints one table: per case the forward time, the bytes the forward must move (inputs + outputs of the
call), their bandwidth as a percent of the measured device copy bandwidth, the same for forward +
backward (training forward, which also writes the state h when u is given, plus the backward's inputs
and outputs), and the forward's speed-up over the PyTorch reference run on the same GPU. The CUDA op is
timed from a CUDA graph (GPU time only); the reference eagerly, as a user runs it. Every case is timed
in several rounds over all the cases, every other round in reverse order, and its fastest round counts:
a case's time can depend on what the run did before it (H100: SDXL 16K level 2 1.55-1.62 ms in the
forward passes of the table, 1.40 ms in the reverse one and when timed alone, also right after any one
of its neighbours in the table).

    python benchmarks/bench_op.py                 # all cases
    python benchmarks/bench_op.py --quick         # a short subset
    python benchmarks/bench_op.py --rounds 1      # one pass
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

from gspn_diffusers.ops import gspn_propagate


def bench(fn, reps: int = 20, warmup: int = 3, graph: bool = True) -> float:
    """Median milliseconds of fn() on the GPU, with CUDA events.

    With `graph`, fn is replayed from a CUDA graph when it can be captured, so that the host's launch
    overhead (larger than the kernel time of the small cases) is not counted.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                fn()
            run = captured.replay
        except RuntimeError as err:
            print(f"(timed without a CUDA graph: {err})", file=sys.stderr)
            torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), reps=30, graph=False)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def case_inputs(batch, channels, groups, height, width, dtype, with_u):
    x = torch.randn(batch, channels, height, width, device="cuda", dtype=dtype)
    gates = torch.randn(batch, 4, 3, groups, height, width, device="cuda", dtype=dtype)
    lam = torch.randn(batch, 4, channels, height, width, device="cuda", dtype=dtype)
    u = torch.randn_like(lam) if with_u else None
    return x, gates, lam, u


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


CASES = [
    # name, (B, C, G, H, W), dtype, chunk, with_u
    ("paper G=C", (16, 8, 8, 1024, 1024), torch.float32, None, False),
    ("paper G=1", (16, 8, 1, 1024, 1024), torch.float32, None, False),
    ("paper G=C chunk4", (16, 8, 8, 1024, 1024), torch.float32, 4, False),
    ("paper G=C fp16", (16, 8, 8, 1024, 1024), torch.float16, None, False),
]
for image, l1, l2 in (("4K", 256, 128), ("8K", 512, 256), ("16K", 1024, 512)):
    for dtype in (torch.float16, torch.bfloat16):
        CASES.append((f"SDXL {image} L1", (2, 80, 1, l1, l1), dtype, None, True))
        CASES.append((f"SDXL {image} L2", (2, 160, 1, l2, l2), dtype, None, True))

QUICK = {"paper G=C", "paper G=1", "SDXL 8K L1", "SDXL 8K L2"}


def run_case(shape, dtype, chunk, with_u, with_reference) -> dict:
    """One timing of a case: milliseconds and bytes of the forward, of forward + backward, and of the
    reference's forward (None without it)."""
    result = _measure(shape, dtype, chunk, with_u, with_reference)
    torch.cuda.empty_cache()  # the case's tensors are gone with _measure's frame
    return result


def _measure(shape, dtype, chunk, with_u, with_reference) -> dict:
    batch, channels, groups, height, width = shape
    x, gates, lam, u = case_inputs(batch, channels, groups, height, width, dtype, with_u)
    fwd = lambda: gspn_propagate(x, gates, lam, u, chunk_size=chunk, backend="cuda")  # noqa: E731
    with torch.no_grad():
        fwd_ms = bench(fwd)
        y = fwd()
    fwd_bytes = nbytes(x, gates, lam, u, y)

    params = [t.requires_grad_() for t in (x, gates, lam, u) if t is not None]
    grad_y = torch.randn_like(y)

    def train_step():
        out = gspn_propagate(x, gates, lam, u, chunk_size=chunk, backend="cuda")
        torch.autograd.grad(out, params, grad_y)

    train_ms = bench(train_step, reps=10)
    state = y if with_u else None  # the forward also writes h when u is given
    bwd_bytes = nbytes(grad_y, x, gates, lam, u, y) + nbytes(*params)
    train_bytes = fwd_bytes + nbytes(state) + bwd_bytes
    for p in params:
        p.requires_grad_(False)

    ref_ms = None
    if with_reference:
        with torch.no_grad():
            ref = lambda: gspn_propagate(x, gates, lam, u, chunk_size=chunk, backend="reference")  # noqa: E731
            ref_ms = bench(ref, reps=2, warmup=1, graph=False)  # as a user runs it
    return {"fwd_ms": fwd_ms, "fwd_bytes": fwd_bytes, "train_ms": train_ms, "train_bytes": train_bytes,
            "ref_ms": ref_ms}


def fastest(timings: list[dict]) -> dict:
    """The rounds of one case merged: its least forward and forward + backward times, and the first
    round's reference time."""
    merged = dict(timings[0])
    merged["fwd_ms"] = min(t["fwd_ms"] for t in timings)
    merged["train_ms"] = min(t["train_ms"] for t in timings)
    return merged


def table_row(name, shape, dtype, chunk, timing, copy_bw) -> dict:
    groups, height, width = shape[2:]
    ref_ms = timing["ref_ms"]
    return {
        "case": name,
        "shape": "x".join(map(str, shape[:2])) + f" G{groups} {height}x{width}",
        "dtype": str(dtype).replace("torch.", ""),
        "chunk": "-" if chunk is None else str(chunk),
        "fwd ms": f"{timing['fwd_ms']:.3f}",
        "fwd GB": f"{timing['fwd_bytes'] / 1e9:.2f}",
        "fwd %BW": f"{100 * timing['fwd_bytes'] / (timing['fwd_ms'] * 1e-3) / copy_bw:.0f}%",
        "f+b ms": f"{timing['train_ms']:.3f}",
        "f+b GB": f"{timing['train_bytes'] / 1e9:.2f}",
        "f+b %BW": f"{100 * timing['train_bytes'] / (timing['train_ms'] * 1e-3) / copy_bw:.0f}%",
        "ref fwd ms": "-" if ref_ms is None else f"{ref_ms:.1f}",
        "speed-up": "-" if ref_ms is None else f"{ref_ms / timing['fwd_ms']:.0f}x",
    }


def print_table(rows):
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(r[c].ljust(w) for c, w in zip(cols, widths)) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short subset of the cases")
    parser.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference timings")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the cases; each case's fastest counts")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    copy_bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{datetime.date.today()} {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"device copy bandwidth (read + write): {copy_bw / 1e12:.2f} TB/s")
    cases = [case for case in CASES if not args.quick or case[0] in QUICK]
    timings = [[] for _ in cases]
    for round_ in range(args.rounds):
        order = list(zip(cases, timings))
        if round_ % 2:  # every other round backwards, so that a case follows other cases
            order.reverse()
        for (name, shape, dtype, chunk, with_u), done in order:
            try:
                t = run_case(shape, dtype, chunk, with_u, with_reference=round_ == 0 and not args.no_reference)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{name} {dtype}: out of memory", flush=True)
                continue
            done.append(t)
            print(f"round {round_ + 1}: {name} {dtype}: forward {t['fwd_ms']:.3f} ms, "
                  f"forward + backward {t['train_ms']:.3f} ms", flush=True)
    rows = [table_row(name, shape, dtype, chunk, fastest(done), copy_bw)
            for (name, shape, dtype, chunk, _), done in zip(cases, timings) if done]
    print()
    print(f"(each case's fastest of {args.rounds} rounds)")
    print_table(rows)


if __name__ == "__main__":
    main()
