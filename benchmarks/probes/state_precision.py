"""Probe: what keeping the backward's float32 states in 16 bits would cost in gradient accuracy.

The CUDA backward stores two float32 states per (batch, direction, channel, position), the forward's h
and the adjoint's gh, and at SDXL sizes they are most of a training step's bytes (docs/kernels.md,
What bounds them). This emulates, on the CPU in float64, a backward whose scans still accumulate in full
precision but whose stored copy of h, of gh or of both is rounded to the input dtype before the gradient
pass uses it, and prints per input the median and the largest, over SHAPES x SEEDS, of the ratio of its
gradient's error (against float64) to the error of the reference run in that dtype: the ratio
tests/ops/test_cuda_kernels.py bounds by 2. (Nothing rounded, every ratio is 1.00.)

    python benchmarks/probes/state_precision.py
"""

from __future__ import annotations

import itertools
import statistics

import torch
import torch.nn.functional as F

from gspn_diffusers.ops.reference import from_lines, gspn_propagate_reference, normalized_taps, to_lines

# (B, C, G, H, W) of the sizes the CUDA tests use, their smallest (a 1 x 8 grid, where one rounding
# weighs most) included, and one SDXL-like group of 80 channels; inputs drawn as there.
SHAPES = [(1, 2, 1, 1, 8), (2, 6, 3, 5, 8), (1, 4, 1, 33, 16), (1, 8, 8, 16, 16), (3, 4, 2, 33, 24),
          (2, 5, 1, 12, 32), (2, 8, 2, 17, 64), (1, 80, 1, 24, 24)]
SEEDS = range(20)
NAMES = ["x", "gates", "lam", "u"]


def stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t as the gradient pass would read it back: rounded to `dtype`, or exact when None."""
    return t if dtype is None else t.to(dtype).to(t.dtype)


def emulated_ops(h_dtype, gh_dtype):
    """Autograd functions for one line step, a chunk's first line and y = u h, whose backward reads h
    and gh (the gradient arriving at a line) as stored in h_dtype / gh_dtype, while the adjoint
    recurrence itself (the gradient sent to the previous line) stays exact."""

    class Step(torch.autograd.Function):
        """h_t = a + w_0 h_{t-1}[i-1] + w_1 h_{t-1}[i] + w_2 h_{t-1}[i+1]; a, w (..., L); h_prev (..., L)."""

        @staticmethod
        def forward(ctx, a, w0, w1, w2, h_prev):
            ctx.save_for_backward(w0, w1, w2, h_prev)
            return a + w0 * F.pad(h_prev[..., :-1], (1, 0)) + w1 * h_prev + w2 * F.pad(h_prev[..., 1:], (0, 1))

        @staticmethod
        def backward(ctx, gh):
            w0, w1, w2, h_prev = ctx.saved_tensors
            gh_read, h_read = stored(gh, gh_dtype), stored(h_prev, h_dtype)
            g0 = gh_read * F.pad(h_read[..., :-1], (1, 0))
            g1 = gh_read * h_read
            g2 = gh_read * F.pad(h_read[..., 1:], (0, 1))
            sent = w1 * gh + F.pad((w0 * gh)[..., 1:], (0, 1)) + F.pad((w2 * gh)[..., :-1], (1, 0))
            return (gh_read, g0.sum_to_size(w0.shape), g1.sum_to_size(w1.shape), g2.sum_to_size(w2.shape), sent)

    class Start(torch.autograd.Function):
        """h_t = a on the first line of a chunk."""

        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, gh):
            return stored(gh, gh_dtype)

    class Modulate(torch.autograd.Function):
        """y = u h."""

        @staticmethod
        def forward(ctx, h, u):
            ctx.save_for_backward(h, u)
            return h * u

        @staticmethod
        def backward(ctx, gy):
            h, u = ctx.saved_tensors
            return gy * u, gy * stored(h, h_dtype)

    return Step, Start, Modulate


def emulated_propagate(x, gates, lam, u, chunk, h_dtype, gh_dtype):
    """gspn_propagate_reference in float64 with the emulated backward (shapes as the op's)."""
    step, start, modulate = (op.apply for op in emulated_ops(h_dtype, gh_dtype))
    b, c, height, width = x.shape
    g = gates.shape[3]
    drive = lam.view(b, 4, g, c // g, height, width) * x.view(b, 1, g, c // g, height, width)
    outputs = []
    for d in range(4):
        w0, w1, w2 = normalized_taps(to_lines(gates[:, d].unsqueeze(3), d).movedim(1, 3)).unbind(dim=-3)
        a = to_lines(drive[:, d], d)
        lines = a.shape[-2]
        h, states = None, []
        for t in range(lines):
            restart = t % (chunk or lines) == 0
            h = start(a[..., t, :]) if restart else step(a[..., t, :], w0[..., t, :], w1[..., t, :], w2[..., t, :], h)
            states.append(h)
        outputs.append(from_lines(torch.stack(states, dim=-2), d))
    return modulate(torch.stack(outputs, dim=1).reshape(b, 4, c, height, width), u)


def gradients(fn, inputs, grad_y):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return torch.autograd.grad(y, leaves, grad_y.to(y.dtype))


def rel_err(got, want, scale):
    """As the CUDA tests': |got - want| / max(|want|, scale)."""
    return ((got.double() - want).norm() / max(want.norm().item(), scale, 1e-30)).item()


def error_ratios(dtype, h_dtype, gh_dtype):
    """Per input, the ratios (emulated error / reference error) over SHAPES x SEEDS."""
    ratios = {name: [] for name in NAMES}
    for seed, (b, c, g, height, width) in itertools.product(SEEDS, SHAPES):
        gen = torch.Generator().manual_seed(seed)
        draw = lambda *size: torch.randn(*size, generator=gen).to(dtype)  # noqa: E731
        inputs = [draw(b, c, height, width), 2 * draw(b, 4, 3, g, height, width), draw(b, 4, c, height, width),
                  draw(b, 4, c, height, width)]
        grad_y = draw(b, 4, c, height, width)
        chunk = None if seed % 2 == 0 else 3
        exact = [t.double() for t in inputs]
        reference = lambda *a: gspn_propagate_reference(*a, chunk_size=chunk)  # noqa: E731
        want = gradients(reference, exact, grad_y.double())
        baseline = gradients(reference, inputs, grad_y)
        emulated = gradients(lambda *a: emulated_propagate(*a, chunk, h_dtype, gh_dtype), exact, grad_y.double())
        scale = 1e-2 * max(t.norm().item() for t in want)
        for name, w, base, emu in zip(NAMES, want, baseline, emulated):
            ratios[name].append(rel_err(emu.to(dtype), w, scale) / max(rel_err(base, w, scale), 1e-12))
    return ratios


def main():
    print("| dtype | stored in 16 bits | " + " | ".join(f"grad {n}: median / max" for n in NAMES) + " |")
    print("|---|---|" + "---|" * len(NAMES))
    for dtype in (torch.float16, torch.bfloat16):
        for label, h_dtype, gh_dtype in (("h", dtype, None), ("gh", None, dtype), ("h and gh", dtype, dtype)):
            ratios = error_ratios(dtype, h_dtype, gh_dtype)
            cells = [f"{statistics.median(r):.2f} / {max(r):.2f}" for r in ratios.values()]
            print(f"| {str(dtype)[6:]} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
