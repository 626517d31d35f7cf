"""Stable tap normalisation (docs/op.md, "Tap weights"): any finite logits give finite taps that sum to
one, equal to the sigmoid-ratio weights, with finite gradients; also where every sigmoid underflows."""

import math

import pytest
import torch

from gspn_diffusers.ops import gspn_propagate
from gspn_diffusers.ops.reference import normalized_taps

# Logits of the three taps at each position of one line of 5; the first and last positions drop a tap.
LINES = {
    "all -1e4": [[-1e4] * 5] * 3,
    "all -90": [[-90.0] * 5] * 3,
    "all +90": [[90.0] * 5] * 3,
    "below -90, spread": [[-1e4, -95.0, -300.0, -91.5, -90.0], [-1e4 + 1.5, -90.0, -301.0, -1e3, -92.0],
                          [-1e4 - 0.5, -97.0, -299.0, -90.0, -1e4]],
    "mixed": [[90.0, -1e4, -90.0, 0.3, -1e4], [-1e4, -1e4, 90.0, -90.0, -95.0],
              [-90.0, 2.0, -1e4, -1e4, 90.0]],
    "kept tap far below a dropped one": [[90.0, -1e4, -1e4, -1e4, -1e4], [-1e4, -1e4, -1e4, -1e4, -1e4],
                                         [-1e4, -1e4, -1e4, -1e4, 90.0]],
}


def log_sigmoid(v: float) -> float:
    return v - math.log1p(math.exp(v)) if v < 0 else -math.log1p(math.exp(-v))


def hand_taps(line):
    """Python-float weights of one line: sigmoid ratios over the kept taps, taken in log space."""
    length = len(line[0])
    out = [[0.0] * length for _ in range(3)]
    for i in range(length):
        kept = [k for k in range(3) if not (k == 0 and i == 0) and not (k == 2 and i == length - 1)]
        logs = {k: log_sigmoid(line[k][i]) for k in kept}
        top = max(logs.values())
        total = sum(math.exp(v - top) for v in logs.values())
        for k in kept:
            out[k][i] = math.exp(logs[k] - top) / total
    return out


@pytest.mark.parametrize("name", list(LINES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_finite_taps_that_sum_to_one(name, dtype):
    logits = torch.tensor(LINES[name], dtype=dtype).unsqueeze(1)  # (3, T=1, L=5)
    taps = normalized_taps(logits)
    assert torch.isfinite(taps).all()
    torch.testing.assert_close(taps.sum(0), torch.ones(1, 5, dtype=dtype))
    assert taps[0, 0, 0] == 0 and taps[2, 0, -1] == 0  # the taps that read outside the line
    want = torch.tensor(hand_taps(LINES[name]), dtype=torch.float64).unsqueeze(1)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(taps.double(), want, rtol=tol, atol=tol)


def test_ordinary_logits_keep_the_sigmoid_ratio():
    logits = 3 * torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.sigmoid(logits)
    s[0, :, 0] = 0
    s[2, :, -1] = 0
    torch.testing.assert_close(normalized_taps(logits), s / s.sum(0), rtol=1e-15, atol=1e-15)


def line_inputs(name, dtype):
    """Direction 2 (top to bottom) over a 2 x 5 grid whose second row receives from the first through the
    named taps; every direction gets the same logits."""
    x = torch.randn(1, 1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam = torch.ones(1, 4, 1, 2, 5, dtype=torch.float64)
    gates = torch.zeros(1, 4, 3, 1, 2, 5, dtype=torch.float64)
    gates[:, :, :, 0, 1] = torch.tensor(LINES[name], dtype=torch.float64)
    gates[:, :, :, 0, 0] = torch.tensor(LINES[name], dtype=torch.float64)[:, [4, 2, 0, 1, 3]]
    return x.to(dtype), gates.to(dtype), lam.to(dtype)


@pytest.mark.parametrize("name", list(LINES))
def test_extreme_logits_propagate_as_computed_by_hand(name):
    x, gates, lam = line_inputs(name, torch.float32)
    y = gspn_propagate(x, gates, lam)
    assert torch.isfinite(y).all()
    w = hand_taps(LINES[name])
    prev, drive = x[0, 0].double().tolist()  # row 0 starts the scan; row 1 adds lam * x = x
    expected = [drive[i] + sum(w[k][i] * prev[i + k - 1] for k in range(3) if 0 <= i + k - 1 < 5)
                for i in range(5)]
    torch.testing.assert_close(y[0, 2, 0, 1].double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(LINES))
def test_extreme_logits_give_finite_gradients_matching_float64(name):
    x, gates, lam = line_inputs(name, torch.float64)
    u = torch.randn(1, 4, 1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad_y = torch.randn(1, 4, 1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grads(dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (x, gates, lam, u)]
        return torch.autograd.grad(gspn_propagate(*inputs), inputs, grad_y.to(dtype))

    want = grads(torch.float64)
    for got, exact in zip(grads(torch.float32), want):
        assert torch.isfinite(got).all() and torch.isfinite(exact).all()
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["all -1e4", "mixed"])
def test_gradcheck_of_the_gates_at_extreme_logits(name):
    x, gates, lam = line_inputs(name, torch.float64)
    assert torch.autograd.gradcheck(lambda g: gspn_propagate(x, g, lam), (gates.requires_grad_(),))


def test_gate_gradient_at_extreme_logits_matches_finite_differences():
    # One position, three kept taps, all far below the sigmoid's range: the weights are softmax(logits)
    # there, so the gradient is that of a softmax, which finite differences of the op reproduce.
    logits = torch.tensor([-1e4, -1e4 + 1.0, -1e4 - 2.0], dtype=torch.float64)
    x = torch.tensor([[[[1.0, 2.0, -3.0], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    lam = torch.ones(1, 4, 1, 2, 3, dtype=torch.float64)

    def middle(logit_values):
        gates = torch.zeros(1, 4, 3, 1, 2, 3, dtype=torch.float64)
        gates[0, 2, :, 0, 1, 1] = logit_values
        return gspn_propagate(x, gates, lam)[0, 2, 0, 1, 1]

    g = logits.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(middle(g), g)
    eps = 1e-4
    numeric = torch.stack([(middle(logits + eps * e) - middle(logits - eps * e)) / (2 * eps)
                           for e in torch.eye(3, dtype=torch.float64)])
    w = torch.softmax(logits - logits.max(), 0)
    prev = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    by_hand = w * (prev - (w * prev).sum())
    torch.testing.assert_close(analytic, by_hand, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(numeric, by_hand, rtol=1e-6, atol=1e-8)
