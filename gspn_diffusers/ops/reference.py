"""Pure PyTorch GSPN-2 propagation: the executable spec of ``gspn_propagate``.

Every other backend is tested against this file. It follows the contract (docs/op.md, and the
docstring of ``gspn_propagate_reference``) literally: lines are materialised with transposes and flips (the fused kernel never does that), and
the scan is a Python loop over lines, vectorised over batch, channels and the positions of a line.

Shapes (B batch, C channels, G gate groups, H x W grid):
    x      (B, C, H, W)
    gates  (B, 4, 3, G, H, W)   raw logits; taps read the previous line at i-1, i, i+1
    lam    (B, 4, C, H, W)
    u      (B, 4, C, H, W) or None
    y      (B, 4, C, H, W)      in x's dtype
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_DIRECTIONS = 4
NUM_TAPS = 3


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def to_lines(t: torch.Tensor, direction: int) -> torch.Tensor:
    """View ``(..., H, W)`` as ``(..., T, L)``: scan index t, then index i inside a line."""
    if direction == 0:
        return t.transpose(-1, -2)
    if direction == 1:
        return t.transpose(-1, -2).flip(-2)
    if direction == 2:
        return t
    return t.flip(-2)


def from_lines(t: torch.Tensor, direction: int) -> torch.Tensor:
    """Inverse of :func:`to_lines`: ``(..., T, L)`` back to ``(..., H, W)``."""
    if direction == 0:
        return t.transpose(-1, -2)
    if direction == 1:
        return t.flip(-2).transpose(-1, -2)
    if direction == 2:
        return t
    return t.flip(-2)


def normalized_taps(gate_lines: torch.Tensor) -> torch.Tensor:
    """Stability-context weights from raw logits laid out as lines.

    gate_lines: (..., 3, T, L) logits of the taps reading i-1, i, i+1 of the previous line.
    Returns (..., 3, T, L) weights w_k = s_k / (s_0 + s_1 + s_2), s_k = sigmoid(logit_k), with the
    taps that would read outside the line (k=0 at i=0, k=2 at i=L-1) dropped, so that every row of the
    propagation matrix sums to one. Computed as a softmax of logsigmoid(logit_k) over the kept taps:
    the same weights, finite (and with finite gradients) for any finite logits, also where every
    sigmoid underflows (all kept logits below about -90 in float32).
    """
    length = gate_lines.shape[-1]
    i = torch.arange(length, device=gate_lines.device)
    outside = torch.stack([i == 0, torch.zeros_like(i, dtype=torch.bool), i == length - 1]).unsqueeze(1)
    log_s = F.logsigmoid(gate_lines).masked_fill(outside, float("-inf"))
    return torch.softmax(log_s, dim=-3)


def _scan_lines(drive: torch.Tensor, taps: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Run the line recurrence.

    drive: (..., T, L) the term lam * x of every position.
    taps:  (..., 3, T, L) normalised weights (broadcastable against drive's leading dims).
    Returns h: (..., T, L).
    """
    num_lines = drive.shape[-2]
    chunk = num_lines if chunk_size is None else chunk_size
    w_left, w_mid, w_right = taps.unbind(dim=-3)
    if num_lines == 0:  # an empty grid; the taps stay in the graph, so that gates get an (empty) gradient
        return drive + 0 * w_mid
    states = []
    h = None
    for t in range(num_lines):
        h_in = drive[..., t, :]
        if t % chunk != 0:
            from_left = F.pad(h[..., :-1], (1, 0))  # h_{t-1}[i-1]
            from_right = F.pad(h[..., 1:], (0, 1))  # h_{t-1}[i+1]
            h_in = (h_in + w_left[..., t, :] * from_left + w_mid[..., t, :] * h
                    + w_right[..., t, :] * from_right)
        h = h_in
        states.append(h)
    return torch.stack(states, dim=-2)


def gspn_propagate_reference(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Four-direction GSPN-2 propagation in plain PyTorch: the spec of ``gspn_propagate`` (docs/op.md).

    Inputs are assumed valid (``gspn_propagate`` checks them). For direction d (0: columns left to
    right, 1: columns right to left, 2: rows top to bottom, 3: rows bottom to top), scan index t, line
    index i, channel c of gate group g = c // (C / G) and the position p of (t, i):

        h_t[i] = lam[b,d,c,p] x[b,c,p] + [t mod chunk != 0] sum_k w_k[p] h_{t-1}[i+k-1]
        y[b,d,c,p] = u[b,d,c,p] h_t[i]

    with w_k = sigmoid(gates[b,d,k,g,p]) normalised over the taps kept inside the line (tap 0 dropped
    at i = 0, tap 2 at i = L-1), computed as a softmax of logsigmoid so that any finite logits give
    finite weights summing to one. chunk_size None is one chunk per direction.

    Args:
        x: (B, C, H, W). gates: (B, 4, 3, G, H, W) logits. lam: (B, 4, C, H, W). u: (B, 4, C, H, W) or None.
        chunk_size: None, or K >= 1 lines per chunk.

    Returns:
        y: (B, 4, C, H, W) in x's dtype, accumulated in float32 (float64 for float64 inputs). Empty where
        B, C, H or W is 0; meta and fake tensors give y of the right shape, and autograd gives every
        input a gradient of its own shape.
    """
    batch, channels, height, width = x.shape
    groups = gates.shape[3]
    per_group = channels // groups
    acc = accumulation_dtype(x.dtype)

    # Channels split as (G, C/G) so that one gate map broadcasts over the channels of its group.
    drive = lam.to(acc).view(batch, NUM_DIRECTIONS, groups, per_group, height, width)
    drive = drive * x.to(acc).view(batch, 1, groups, per_group, height, width)
    gates = gates.to(acc).unsqueeze(4)  # (B, 4, 3, G, 1, H, W)

    outputs = []
    for d in range(NUM_DIRECTIONS):
        # taps: (B, G, 1, 3, T, L); drive: (B, G, C/G, T, L)
        taps = normalized_taps(to_lines(gates[:, d], d).movedim(1, 3))
        h = _scan_lines(to_lines(drive[:, d], d), taps, chunk_size)
        outputs.append(from_lines(h, d))
    y = torch.stack(outputs, dim=1).reshape(batch, NUM_DIRECTIONS, channels, height, width)
    if u is not None:
        y = y * u.to(acc)
    return y.to(x.dtype)
