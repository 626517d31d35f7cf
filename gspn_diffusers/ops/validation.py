"""Input checks of ``gspn_propagate``: every refusal is a ValueError that names the shapes."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_inputs(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor | None,
    chunk_size: int | None,
) -> None:
    """Raise ValueError unless the arguments satisfy the op's contract (docs/op.md)."""
    def fail(reason: str) -> None:
        shapes = f"x {_shape(x)}, gates {_shape(gates)}, lam {_shape(lam)}, u {_shape(u)}"
        raise ValueError(f"gspn_propagate: {reason} (got {shapes})")

    named = {"x": x, "gates": gates, "lam": lam, "u": u}
    for name, t in named.items():
        if t is None and name == "u":
            continue
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, not {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            fail(f"{name} must be float16, bfloat16, float32 or float64, not {t.dtype}")

    if x.dim() != 4:
        fail("x must be (B, C, H, W)")
    if gates.dim() != 6:
        fail("gates must be (B, 4, 3, G, H, W)")
    if lam.dim() != 5:
        fail("lam must be (B, 4, C, H, W)")
    if u is not None and u.dim() != 5:
        fail("u must be (B, 4, C, H, W) or None")

    batch, channels, height, width = x.shape
    if gates.shape[1] != 4 or gates.shape[2] != 3:
        fail("gates must hold 4 directions and 3 taps in dims 1 and 2")
    groups = gates.shape[3]
    if gates.shape[0] != batch or tuple(gates.shape[4:]) != (height, width):
        fail("gates must match x in batch and in (H, W)")
    if groups < 1 or channels % groups != 0:
        fail(f"the number of gate groups G={groups} must divide the channels C={channels}")
    expected = (batch, 4, channels, height, width)
    if tuple(lam.shape) != expected:
        fail(f"lam must be {expected}")
    if u is not None and tuple(u.shape) != expected:
        fail(f"u must be {expected}")

    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"gspn_propagate: all inputs must be on one device, got {sorted(map(str, devices))}")

    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"gspn_propagate: chunk_size must be None or an int >= 1, got {chunk_size!r}")
