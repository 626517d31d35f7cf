"""The GSPN-2 propagation op.

``gspn_propagate`` is the one public entry point; it checks its inputs and hands them to a backend:
``"reference"`` (pure PyTorch, ``reference.py``, any device) or ``"cuda"`` (the fused kernels of
``csrc/``, CUDA tensors). ``"auto"`` picks CUDA for CUDA tensors and the reference elsewhere.
"""

from __future__ import annotations

import torch

from .reference import gspn_propagate_reference
from .validation import check_inputs

BACKENDS = ("auto", "reference", "cuda")


def gspn_propagate(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Four-direction GSPN-2 line-scan propagation (docs/op.md).

    Args:
        x: (B, C, H, W) input.
        gates: (B, 4, 3, G, H, W) raw gate logits: 4 directions (left-to-right, right-to-left,
            top-to-bottom, bottom-to-top), 3 taps reading the previous line at i-1, i, i+1, and G gate
            groups (G divides C; channel c uses group c // (C / G)).
        lam: (B, 4, C, H, W) input modulation, one per direction.
        u: (B, 4, C, H, W) output modulation, or None for 1.
        chunk_size: None propagates over the whole image; K restarts the recurrence every K lines.
        backend: "auto", "reference" or "cuda".

    Returns:
        y: (B, 4, C, H, W) in x's dtype, accumulated in float32 (float64 for float64 inputs).

    Raises:
        ValueError: wrong rank, shapes that disagree, G not dividing C, mixed devices, chunk_size < 1,
            or an unknown backend.
    """
    check_inputs(x, gates, lam, u, chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"gspn_propagate: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if x.is_cuda else "reference"
    if backend == "reference":
        return gspn_propagate_reference(x, gates, lam, u, chunk_size)
    from .cuda import gspn_propagate_cuda

    return gspn_propagate_cuda(x, gates, lam, u, chunk_size)


__all__ = ["gspn_propagate", "gspn_propagate_reference", "BACKENDS"]
