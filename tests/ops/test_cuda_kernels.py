"""The fused CUDA kernels against the reference (the spec). Marked `cuda`: skipped without a GPU.

Inputs are drawn fresh every run (seeded from the clock and printed on failure), so repeated runs
cover more of the input space than a fixed seed would.
"""

import random
import time

import pytest
import torch

from gspn_diffusers.ops import gspn_propagate

pytestmark = pytest.mark.cuda

SEED = int(time.time() * 1000) % 2**31
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, C, G, H, W): odd sizes, H != W, lines of length 1, every kind of gate grouping. Widths that are
# multiples of 8 take the line-parallel scans (forward and adjoint), the others the generic ones; columns
# of more than 256 rows (520) are split over a cluster of blocks that exchange halos. The column scans
# send y through TMA store boxes where a box lies inside the plane, else (widths 12, 40, 260: a last group
# of fewer steps; the last band of 520 rows) each lane stores its own. Groups of an even number of
# channels are scanned two channels per block; groups of 4 or more channels read the tap weights that the
# taps pass computed once (csrc/gspn_taps.cuh), in blocks of two channels or (5) of one. The gradient
# pass takes tiles of 8 rows x 32 columns (x 128 where W % 4 == 0): 45 and 260 are split over several, the
# last partial; grids this small split every gate group into slices of one channel, whose blocks add
# their gate gradients atomically (test_gradient_slices_by_grid_size has the other cases).
SHAPES = [
    (2, 6, 3, 5, 8),
    (1, 4, 1, 33, 16),
    (2, 8, 2, 17, 64),
    (1, 2, 1, 1, 8),
    (1, 1, 1, 1, 1),
    (2, 3, 3, 1, 7),
    (1, 4, 2, 9, 1),
    (2, 6, 1, 5, 13),
    (1, 8, 8, 16, 12),
    (3, 4, 2, 33, 17),
    (1, 6, 3, 64, 40),
    (2, 16, 1, 40, 64),
    (1, 2, 1, 200, 24),
    (1, 4, 2, 520, 16),
    (1, 20, 1, 9, 16),
    (1, 3, 1, 19, 45),
    (1, 2, 1, 21, 260),
    (2, 5, 1, 12, 32),
]
CHUNKS = [None, 1, 3, 8, 100]


def make_inputs(shape, dtype, with_u=True, seed=0):
    b, c, g, h, w = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *s: torch.randn(*s, device="cuda", generator=gen).to(dtype)  # noqa: E731
    x = make(b, c, h, w)
    gates = 2 * make(b, 4, 3, g, h, w)
    lam = make(b, 4, c, h, w)
    u = make(b, 4, c, h, w) if with_u else None
    return x, gates, lam, u


def rel_err(a, b, scale=0.0):
    """|a - b| / max(|b|, scale). `scale` floors the denominator where the exact value may be zero: gates
    of lines of length one have a single tap of weight 1 whatever its logit, and get no gradient."""
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), scale, 1e-30)).item()


def grads_of(y, inputs, grad_y):
    """Gradients of every input that is not None; zeros where y does not depend on one (chunk 1: gates)."""
    used = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(y, used, grad_y, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(used, grads)]


def as64(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]


def poison_allocator(numel):
    """Leave NaNs where the next allocations will land, so unwritten outputs show up as NaN."""
    junk = torch.full((numel,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(shape, chunk, dtype):
    seed = SEED + hash((shape, chunk, str(dtype))) % 1000
    inputs = make_inputs(shape, dtype, with_u=(chunk != 3), seed=seed)
    poison_allocator(4 * inputs[0].numel() * 4 + 1024)
    y = check_forward(inputs, chunk, f"seed {seed}")
    assert y.dtype == dtype and y.shape == (shape[0], 4) + shape[1:2] + shape[3:]


def check_forward(inputs, chunk, message):
    """y of the CUDA op against float64 (float32: within 1e-5; 16-bit: within twice the error of the
    reference run in that dtype); every element finite (a poisoned, unwritten one is NaN). Returns y."""
    y = gspn_propagate(*inputs, chunk_size=chunk, backend="cuda")
    assert torch.isfinite(y).all(), f"unwritten or non-finite output ({message})"
    y64 = gspn_propagate(*as64(*inputs), chunk_size=chunk, backend="reference")
    if y.dtype == torch.float32:
        bound = 1e-5
    else:
        bound = 2 * rel_err(gspn_propagate(*inputs, chunk_size=chunk, backend="reference"), y64) + 1e-6
    assert rel_err(y, y64) <= bound, message
    return y


def check_gradients(shape, chunk, with_u, dtype, seed, inputs=None):
    """Every input's gradient against float64 (float32: within 1e-4; 16-bit: within twice the error
    of the reference run in that dtype). `inputs` replaces the random ones where given."""
    if inputs is None:
        inputs = make_inputs(shape, dtype, with_u=with_u, seed=seed)
    inputs = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    y = gspn_propagate(*inputs, chunk_size=chunk, backend="cuda")
    grad_y = torch.randn_like(y)
    poison_allocator(8 * y.numel() * 4 + 1024)
    grads = grads_of(y, inputs, grad_y)

    inputs64 = [t.requires_grad_() if t is not None else None for t in as64(*inputs)]
    y64 = gspn_propagate(*inputs64, chunk_size=chunk, backend="reference")
    grads64 = grads_of(y64, inputs64, grad_y.double())
    if dtype != torch.float32:
        y_ref = gspn_propagate(*inputs, chunk_size=chunk, backend="reference")
        grads_ref = grads_of(y_ref, inputs, grad_y)
    scale = 1e-2 * max(g.norm().item() for g in grads64)
    names = ["x", "gates", "lam", "u"]
    for k, (got, want) in enumerate(zip(grads, grads64)):
        assert torch.isfinite(got).all(), f"grad {names[k]} not finite (seed {seed})"
        err = rel_err(got, want, scale)
        if dtype == torch.float32:
            assert err < 1e-4, f"grad {names[k]}: {err:.2e} (seed {seed})"
        else:
            bound = 2 * rel_err(grads_ref[k], want, scale) + 1e-5
            assert err <= bound, f"grad {names[k]}: {err:.2e} > {bound:.2e} (seed {seed})"


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("chunk", [None, 1, 3, 100])
@pytest.mark.parametrize("with_u", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(shape, chunk, with_u, dtype):
    check_gradients(shape, chunk, with_u, dtype, SEED + hash((shape, chunk, with_u, str(dtype))) % 1000)


# Columns over a cluster of 2 and 4 blocks (bands of 150, 195 and 250 rows with 16-row halos refreshed
# every 16 steps), in one and two channels per block, with partial groups at the line ends; 4 and 5
# channels a group with staged tap weights.
@pytest.mark.parametrize("shape", [(1, 2, 1, 300, 24), (1, 4, 1, 777, 16), (1, 2, 2, 1000, 40), (1, 5, 1, 300, 24)])
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tall_columns_split_over_a_cluster(shape, chunk, dtype):
    check_forward_and_gradients(shape, chunk, dtype)


def check_forward_and_gradients(shape, chunk, dtype):
    seed = SEED + hash((shape, chunk, str(dtype))) % 1000
    check_forward(make_inputs(shape, dtype, seed=seed), chunk, f"seed {seed}")
    check_gradients(shape, chunk, True, dtype, seed)


def test_random_shapes_against_reference():
    rng = random.Random(SEED)
    for _ in range(12):
        g = rng.choice([1, 2, 3])
        width = rng.choice([rng.randint(1, 70), 8 * rng.randint(1, 9)])
        shape = (rng.randint(1, 3), g * rng.randint(1, 4), g, rng.randint(1, 70), width)
        chunk = rng.choice([None, 1, 2, 5, 16, 200])
        dtype = rng.choice(DTYPES)
        inputs = make_inputs(shape, dtype, seed=rng.randint(0, 10**6))
        check_forward(inputs, chunk, f"{shape} chunk={chunk} {dtype} (seed {SEED})")


# The row scans give a thread 2 positions of rows of 257 to 512 positions, else 4 (csrc/gspn_rows.cuh:
# row_positions): 264 takes 2, 520 takes 4 over several warps, forward and adjoint.
@pytest.mark.parametrize("shape", [(1, 2, 1, 7, 264), (2, 4, 1, 5, 520)])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_every_positions_per_thread(shape, chunk, dtype):
    check_forward_and_gradients(shape, chunk, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_lines_vectorised_paths(dtype):
    # 1024-long lines: 4 positions per thread in the row scans; W % 8 == 0 takes the packed column loads.
    check_forward(make_inputs((1, 2, 1, 24, 1024), dtype, seed=SEED), None, f"seed {SEED}")


@pytest.mark.parametrize("width", [16, 13])
def test_strided_views_of_one_coefficient_tensor(width):
    # The processor slices gates, lam and u out of one conv output: views with a larger batch stride.
    b, c, g, h = 2, 4, 1, 9
    coeffs = torch.randn(b, 12 * g + 8 * c, h, width, device="cuda", requires_grad=True)
    x = torch.randn(b, c, h, width, device="cuda", requires_grad=True)
    gates = coeffs[:, : 12 * g].view(b, 4, 3, g, h, width)
    lam = coeffs[:, 12 * g : 12 * g + 4 * c].view(b, 4, c, h, width)
    u = coeffs[:, 12 * g + 4 * c :].view(b, 4, c, h, width)
    y = gspn_propagate(x, gates, lam, u, chunk_size=4, backend="cuda")
    y_ref = gspn_propagate(x, gates, lam, u, chunk_size=4, backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), [x, coeffs])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, coeffs])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# The gradient pass slices a gate group's channels only where its tiles of 8 x 128 positions alone give
# fewer than 512 blocks (csrc/gspn_api.h): 512 tiles take the 4 channels whole (gate gradients written
# directly); 32 tiles split 96 channels into 16 slices of 6 (added atomically).
@pytest.mark.parametrize("shape", [(1, 4, 1, 512, 1024), (1, 96, 1, 64, 512)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_slices_by_grid_size(shape, dtype):
    check_gradients(shape, None, True, dtype, SEED)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_of_lines_longer_than_the_line_parallel_kernel(dtype):
    # 1032-long rows (aligned, over 1024) take the generic scans, forward and adjoint, 4 positions per thread.
    check_gradients((1, 2, 1, 3, 1032), 5, True, dtype, SEED)


def test_2048_long_float16_scan_stays_finite():
    x, gates, lam, _ = make_inputs((1, 2, 1, 3, 2048), torch.float16, with_u=False, seed=SEED)
    x, lam = x.abs(), lam.abs()
    y = gspn_propagate(x, gates, lam, backend="cuda")
    assert torch.isfinite(y).all()
    y64 = gspn_propagate(*as64(x, gates, lam), backend="reference")
    assert rel_err(y, y64) < 2e-3


@pytest.mark.parametrize("shape", [(1, 2, 1, 24, 32), (1, 4, 1, 24, 32), (1, 2, 1, 13, 13)])
def test_gate_logits_outside_the_sigmoid_range(shape):
    # Taps of -100 and +100 among ordinary ones, on the line-parallel (W = 32; with staged tap weights
    # where the group has 4 channels, so that w_1 = 1 - w_0 - w_2 of a vanishing tap is tested) and the
    # generic (W = 13) scans.
    x, gates, lam, u = make_inputs(shape, torch.float32, seed=SEED)
    gates[:, :, 0, ..., ::3] = -100.0
    gates[:, :, 2, ..., 1::3] = -100.0
    gates[:, :, 1, ..., ::4] = 100.0
    check_forward((x, gates, lam, u), None, f"seed {SEED}")


def extreme_gates(pattern, gates):
    """Gate logits where sigmoids underflow or saturate (docs/op.md, "Tap weights"), on edges and inside."""
    g = gates.float()
    if pattern == "all -1e4":
        return torch.full_like(g, -1e4)
    if pattern == "all +90":
        return torch.full_like(g, 90.0)
    if pattern == "below -90":  # every tap below -90, unequal: weights in the shifted form only
        return -90.0 - 5 * g.abs()
    g = g.clone()  # mixed: ordinary logits with -1e4, -90 and +90 taps, and whole rows and columns at -1e4
    g[:, :, 0, ..., ::3] = -1e4
    g[:, :, 2, ..., 1::3] = -90.0
    g[:, :, 1, ..., ::4] = 90.0
    g[..., 0, :] = -1e4
    g[..., :, -1] = -1e4
    return g


# Logits at and below -90 on every tap (0/0 in the plain sigmoid ratio), +90, and mixed, through the
# line-parallel scans (W = 32, staged tap weights where a group has 4 channels), the generic scans (W = 13)
# and a cluster of column blocks (300 rows); forward and every gradient against float64.
@pytest.mark.parametrize("pattern", ["all -1e4", "below -90", "all +90", "mixed"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 24, 32), (1, 4, 1, 24, 32), (2, 3, 3, 13, 13), (1, 2, 1, 300, 24)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_gate_logits_forward_and_gradients(pattern, shape, dtype):
    seed = SEED + hash((pattern, shape, str(dtype))) % 1000
    x, gates, lam, u = make_inputs(shape, dtype, seed=seed)
    gates = extreme_gates(pattern, gates).to(dtype)
    check_forward((x, gates, lam, u), None, f"{pattern}, seed {seed}")
    check_gradients(shape, None, True, dtype, seed, inputs=(x, gates, lam, u))
    check_gradients(shape, 5, True, dtype, seed, inputs=(x, gates, lam, u))


# Empty grids return empty outputs and gradients of every input's shape without launching a kernel;
# where C = 0 the gates still hold planes, and their gradient is zero.
@pytest.mark.parametrize("shape", [(1, 2, 1, 0, 8), (1, 2, 1, 8, 0), (0, 2, 1, 8, 8), (1, 0, 1, 8, 8)])
def test_empty_grids(shape):
    x, gates, lam, u = (t.requires_grad_() for t in make_inputs(shape, torch.float16, seed=SEED))
    y = gspn_propagate(x, gates, lam, u, chunk_size=3, backend="cuda")
    assert y.shape == (shape[0], 4, shape[1]) + shape[3:] and y.dtype == torch.float16
    grads = torch.autograd.grad(y, (x, gates, lam, u), torch.ones_like(y))
    for t, g in zip((x, gates, lam, u), grads):
        assert g.shape == t.shape and not g.any()


def test_fake_cuda_tensors_trace_forward_and_backward():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, gates, lam, u = (torch.empty(s, device="cuda").requires_grad_()
                            for s in [(2, 4, 9, 16), (2, 4, 3, 2, 9, 16), (2, 4, 4, 9, 16), (2, 4, 4, 9, 16)])
        y = gspn_propagate(x, gates, lam, u, backend="cuda")
        grads = torch.autograd.grad(y.sum(), (x, gates, lam, u))
    assert y.shape == (2, 4, 4, 9, 16) and y.device.type == "cuda"
    assert [g.shape for g in grads] == [t.shape for t in (x, gates, lam, u)]


def test_forward_is_complete_for_the_callers_stream():
    # The forward runs its column scans on a second stream (csrc/gspn_launch.cuh) and joins it back: work
    # queued after the call on the caller's stream, a non-default one or inside a CUDA graph, sees all of y.
    inputs = make_inputs((1, 8, 2, 520, 256), torch.float16, seed=SEED)  # line-parallel, clusters of 3
    want = gspn_propagate(*inputs, backend="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        poison_allocator(4 * want.numel() * 4)
        got = gspn_propagate(*inputs, backend="cuda").clone()
        for _ in range(2):  # warm-up on a side stream before capture, as torch.cuda.graph asks
            gspn_propagate(*inputs, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gspn_propagate(*inputs, backend="cuda").clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert torch.equal(replayed, want)


def test_opcheck_registered_op():
    import gspn_diffusers.ops.cuda  # noqa: F401  (registers the ops, also when this test runs alone)

    for dtype in DTYPES:
        x, gates, lam, u = make_inputs((2, 4, 2, 7, 9), dtype, seed=SEED)
        for t in (x, gates, lam, u):
            t.requires_grad_()
        torch.library.opcheck(torch.ops.gspn_diffusers.propagate.default, (x, gates, lam, u, 3, True))
        # without a saved state the backward rebuilds it
        torch.library.opcheck(torch.ops.gspn_diffusers.propagate.default, (x, gates, lam, None, 1 << 30, False))


def test_compiled_equals_eager():
    x, gates, lam, u = make_inputs((2, 4, 1, 12, 20), torch.float32, seed=SEED)

    def block(x, gates, lam, u):
        return gspn_propagate(x * 2, gates, lam, u, chunk_size=4).sum(1)

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, gates, lam, u), block(x, gates, lam, u))


def test_auto_backend_uses_cuda_kernels(monkeypatch):
    import gspn_diffusers.ops as ops

    x, gates, lam, u = make_inputs((1, 2, 1, 4, 4), torch.float32, seed=SEED)
    monkeypatch.setattr(ops, "gspn_propagate_reference", None)  # any fallback would now fail
    y = gspn_propagate(x, gates, lam, u)
    assert y.is_cuda
