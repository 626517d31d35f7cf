"""The GSPN-2 op's reference backend against its contract (docs/op.md)."""

import math

import pytest
import torch

from gspn_diffusers.ops import gspn_propagate


def random_inputs(b=1, c=4, g=2, h=3, w=5, dtype=torch.float64, with_u=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    x = make(b, c, h, w)
    gates = 2 * make(b, 4, 3, g, h, w)
    lam = make(b, 4, c, h, w)
    u = make(b, 4, c, h, w) if with_u else None
    return x, gates, lam, u


def line_position(d, t, i, H, W):
    """(h, w) of scan index t and line index i in direction d, straight from the contract's table."""
    return {0: (i, t), 1: (i, W - 1 - t), 2: (t, i), 3: (H - 1 - t, i)}[d]


def naive_propagate(x, gates, lam, u, chunk_size):
    """One pixel at a time in Python floats: an independent transcription of the contract."""
    B, C, H, W = x.shape
    G = gates.shape[3]
    y = torch.zeros(B, 4, C, H, W, dtype=torch.float64)
    for b in range(B):
        for d in range(4):
            T, L = (W, H) if d < 2 else (H, W)
            chunk = chunk_size or T
            for c in range(C):
                g = c // (C // G)
                prev = [0.0] * L
                for t in range(T):
                    cur = []
                    for i in range(L):
                        hh, ww = line_position(d, t, i, H, W)
                        value = float(lam[b, d, c, hh, ww]) * float(x[b, c, hh, ww])
                        if t % chunk != 0:
                            s = [1 / (1 + math.exp(-float(gates[b, d, k, g, hh, ww]))) for k in range(3)]
                            if i == 0:
                                s[0] = 0.0
                            if i == L - 1:
                                s[2] = 0.0
                            for k in range(3):
                                j = i + k - 1
                                if 0 <= j < L:
                                    value += s[k] / sum(s) * prev[j]
                        cur.append(value)
                        y[b, d, c, hh, ww] = value * (1.0 if u is None else float(u[b, d, c, hh, ww]))
                    prev = cur
    return y


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 9])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_matches_pixel_by_pixel_transcription(chunk_size, groups):
    x, gates, lam, u = random_inputs(b=2, c=4, g=groups, h=3, w=5, seed=groups * 10 + (chunk_size or 0))
    y = gspn_propagate(x, gates, lam, u, chunk_size=chunk_size)
    torch.testing.assert_close(y, naive_propagate(x, gates, lam, u, chunk_size), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("height,width", [(1, 4), (4, 1), (1, 1), (2, 7)])
def test_degenerate_lines_match_transcription(height, width):
    x, gates, lam, u = random_inputs(c=2, g=1, h=height, w=width, with_u=False)
    y = gspn_propagate(x, gates, lam)
    torch.testing.assert_close(y, naive_propagate(x, gates, lam, None, None), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_constant_input_gives_running_sums(chunk_size):
    # Every row of the propagation matrix sums to one, so whatever the gates, a constant line of ones
    # propagates to (t mod chunk) + 1 at scan index t.
    H, W = 4, 6
    _, gates, _, _ = random_inputs(c=3, g=3, h=H, w=W)
    x = torch.ones(1, 3, H, W, dtype=torch.float64)
    lam = torch.ones(1, 4, 3, H, W, dtype=torch.float64)
    y = gspn_propagate(x, gates, lam, chunk_size=chunk_size)

    def expected(t_index):
        chunk = chunk_size or 10**9
        return (t_index % chunk + 1).to(torch.float64)

    w_idx = torch.arange(W).expand(H, W)
    h_idx = torch.arange(H).unsqueeze(1).expand(H, W)
    for d, t in enumerate([w_idx, W - 1 - w_idx, h_idx, H - 1 - h_idx]):
        torch.testing.assert_close(y[0, d], expected(t).expand(3, H, W))


def test_edge_positions_use_two_taps():
    # Direction 2 (top to bottom) over a 2x3 grid: row 0 is [a, b, c] and row 1 receives from it.
    a, b, c = 2.0, -1.0, 5.0
    x = torch.tensor([[[[a, b, c], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    logits = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)  # taps reading i-1, i, i+1
    gates = logits.view(1, 1, 3, 1, 1, 1).expand(1, 4, 3, 1, 2, 3).clone()
    lam = torch.ones(1, 4, 1, 2, 3, dtype=torch.float64)
    y = gspn_propagate(x, gates, lam)[0, 2, 0, 1]

    s0, s1, s2 = (1 / (1 + math.exp(-v)) for v in logits.tolist())
    expected = [
        (s1 * a + s2 * b) / (s1 + s2),  # i = 0 has no left neighbour
        (s0 * a + s1 * b + s2 * c) / (s0 + s1 + s2),
        (s0 * b + s1 * c) / (s0 + s1),  # i = L-1 has no right neighbour
    ]
    torch.testing.assert_close(y, torch.tensor(expected, dtype=torch.float64))


def test_gate_group_maps_to_its_channels():
    x, gates, lam, u = random_inputs(c=6, g=3)
    y = gspn_propagate(x, gates, lam, u)
    per_channel = gates.repeat_interleave(2, dim=3)  # channel c reads group c // 2
    torch.testing.assert_close(y, gspn_propagate(x, per_channel, lam, u))

    changed = gates.clone()
    changed[:, :, :, 2] += 1.5  # only channels 4 and 5 read group 2
    y_changed = gspn_propagate(x, changed, lam, u)
    torch.testing.assert_close(y_changed[:, :, :4], y[:, :, :4])
    assert not torch.allclose(y_changed[:, :, 4:], y[:, :, 4:])


def test_output_modulation_multiplies():
    x, gates, lam, u = random_inputs()
    torch.testing.assert_close(gspn_propagate(x, gates, lam, u), u * gspn_propagate(x, gates, lam))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_flip_width_swaps_directions_0_and_1(chunk_size):
    x, gates, lam, u = random_inputs(h=4, w=5)
    fw = lambda t: t.flip(-1)  # noqa: E731
    # the flip exchanges directions 0 and 1 and reverses the rows that 2 and 3 scan
    flipped_gates = fw(gates[:, [1, 0, 2, 3]]).clone()
    flipped_gates[:, 2:] = flipped_gates[:, 2:, [2, 1, 0]]  # rows reversed: left and right taps swap
    y = gspn_propagate(x, gates, lam, u, chunk_size=chunk_size)
    y_flipped = gspn_propagate(
        fw(x), flipped_gates, fw(lam[:, [1, 0, 2, 3]]), fw(u[:, [1, 0, 2, 3]]), chunk_size=chunk_size
    )
    torch.testing.assert_close(y_flipped, fw(y[:, [1, 0, 2, 3]]))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_flip_height_swaps_directions_2_and_3(chunk_size):
    x, gates, lam, u = random_inputs(h=5, w=4)
    fh = lambda t: t.flip(-2)  # noqa: E731
    flipped_gates = fh(gates[:, [0, 1, 3, 2]]).clone()
    flipped_gates[:, :2] = flipped_gates[:, :2, [2, 1, 0]]  # columns reversed: taps swap
    y = gspn_propagate(x, gates, lam, u, chunk_size=chunk_size)
    y_flipped = gspn_propagate(
        fh(x), flipped_gates, fh(lam[:, [0, 1, 3, 2]]), fh(u[:, [0, 1, 3, 2]]), chunk_size=chunk_size
    )
    torch.testing.assert_close(y_flipped, fh(y[:, [0, 1, 3, 2]]))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_transpose_swaps_directions_0_and_2(chunk_size):
    x, gates, lam, u = random_inputs(h=3, w=6)
    tr = lambda t: t.transpose(-1, -2)  # noqa: E731
    perm = [2, 3, 0, 1]
    y = gspn_propagate(x, gates, lam, u, chunk_size=chunk_size)
    y_t = gspn_propagate(tr(x), tr(gates[:, perm]), tr(lam[:, perm]), tr(u[:, perm]), chunk_size=chunk_size)
    torch.testing.assert_close(y_t, tr(y[:, perm]))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("with_u", [True, False])
def test_gradcheck_every_input(chunk_size, with_u):
    inputs = [t.requires_grad_() if t is not None else None
              for t in random_inputs(b=1, c=2, g=1, h=3, w=4, with_u=with_u)]
    x, gates, lam, u = inputs

    def fn(*args):
        return gspn_propagate(*args, chunk_size=chunk_size)

    args = (x, gates, lam, u) if with_u else (x, gates, lam)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_accumulates_in_float32(dtype):
    x, gates, lam, u = random_inputs(c=4, g=1, h=40, w=7, dtype=dtype)
    y = gspn_propagate(x, gates, lam, u)
    assert y.dtype == dtype
    # Upcasting the same (rounded) inputs and rounding once at the end is what float32 accumulation means.
    exact = gspn_propagate(x.float(), gates.float(), lam.float(), u.float()).to(dtype)
    assert torch.equal(y, exact)
    assert torch.isfinite(y).all()


def test_long_float16_scan_stays_finite_and_close():
    x, gates, lam, _ = random_inputs(c=2, g=1, h=2, w=2048, dtype=torch.float16, with_u=False)
    lam = lam.abs()
    x = x.abs()
    y = gspn_propagate(x, gates, lam)
    y64 = gspn_propagate(x.double(), gates.double(), lam.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y64, rtol=2e-3, atol=2e-3)


def _bad(b=1, c=4, g=2, h=3, w=5):
    x, gates, lam, u = random_inputs(b=b, c=c, g=g, h=h, w=w, dtype=torch.float32)
    return dict(x=x, gates=gates, lam=lam, u=u)


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda a: a.update(x=a["x"][0]), "x must be (B, C, H, W)"),
        (lambda a: a.update(gates=a["gates"][0]), "gates must be (B, 4, 3, G, H, W)"),
        (lambda a: a.update(lam=a["lam"][0]), "lam must be (B, 4, C, H, W)"),
        (lambda a: a.update(u=a["u"][0]), "u must be (B, 4, C, H, W) or None"),
        (lambda a: a.update(gates=a["gates"][:, :2]), "4 directions and 3 taps"),
        (lambda a: a.update(gates=a["gates"][:, :, :2]), "4 directions and 3 taps"),
        (lambda a: a.update(gates=torch.zeros(1, 4, 3, 3, 3, 5)), "G=3 must divide the channels C=4"),
        (lambda a: a.update(gates=a["gates"][..., :4]), "gates must match x"),
        (lambda a: a.update(gates=torch.cat([a["gates"]] * 2)), "gates must match x"),
        (lambda a: a.update(lam=a["lam"][:, :, :3]), "lam must be (1, 4, 4, 3, 5)"),
        (lambda a: a.update(u=a["u"][..., :2, :]), "u must be (1, 4, 4, 3, 5)"),
        (lambda a: a.update(x=a["x"].long()), "x must be float16"),
    ],
)
def test_bad_shapes_are_refused_with_the_shapes(change, fragment):
    args = _bad()
    change(args)
    with pytest.raises(ValueError) as err:
        gspn_propagate(args["x"], args["gates"], args["lam"], args["u"])
    assert fragment in str(err.value)
    assert f"x {tuple(args['x'].shape)}" in str(err.value)


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True])
def test_bad_chunk_size_is_refused(chunk_size):
    args = _bad()
    with pytest.raises(ValueError, match="chunk_size"):
        gspn_propagate(**args, chunk_size=chunk_size)


def test_mixed_devices_are_refused():
    args = _bad()
    args["lam"] = args["lam"].to("meta")
    with pytest.raises(ValueError, match="one device"):
        gspn_propagate(**args)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        gspn_propagate(**_bad(), backend="triton")
