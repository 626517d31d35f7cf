"""CUDA backend of ``gspn_propagate``: the fused kernels of csrc/ as torch.library custom ops.

``gspn_diffusers::propagate`` and ``gspn_diffusers::propagate_backward`` are registered with fake
(meta) implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them without a
graph break. When a backward will follow, the forward also returns the state h (before u) in float32:
the backward's gate gradients take differences of products of h, which a 16-bit copy would blur. The
state is the kernels' own: its column-direction planes are stored in tiles of 4 columns (csrc/gspn_api.h).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .build import load_extension

_GLOBAL = 1 << 30  # a chunk longer than any line: global propagation


@torch.library.custom_op("gspn_diffusers::propagate", mutates_args=(), device_types="cuda")
def propagate(
    x: Tensor, gates: Tensor, lam: Tensor, u: Tensor | None, chunk_size: int, save_state: bool
) -> tuple[Tensor, Tensor]:
    """Fused forward: (y, state); state is the float32 h when ``save_state``, else empty."""
    return _launch_forward(x, gates, lam, u, chunk_size, save_state)


def _launch_forward(x, gates, lam, u, chunk_size: int, save_state: bool) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:  # an empty grid (B, C, H or W = 0): nothing to launch
        return _propagate_shapes(x, save_state)
    return load_extension().forward(x, gates, lam, u, chunk_size, save_state)


def _propagate_shapes(x: Tensor, save_state: bool) -> tuple[Tensor, Tensor]:
    batch, channels, height, width = x.shape
    y = x.new_empty(batch, 4, channels, height, width)
    state = y.new_empty(y.shape if save_state else (0,), dtype=torch.float32)
    return y, state


@propagate.register_fake
def _(x, gates, lam, u, chunk_size, save_state):
    return _propagate_shapes(x, save_state)


@torch.library.custom_op("gspn_diffusers::propagate_backward", mutates_args=(), device_types="cuda")
def propagate_backward(
    grad_y: Tensor, x: Tensor, gates: Tensor, lam: Tensor, u: Tensor | None, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused backward: (grad_x, grad_gates, grad_lam, grad_u); grad_u is empty when u is None."""
    if x.numel() == 0:  # an empty grid: y depends on nothing (gates hold G >= 1 planes even where C = 0)
        gu = torch.zeros_like(u) if u is not None else x.new_empty(0)
        return torch.zeros_like(x), torch.zeros_like(gates), torch.zeros_like(lam), gu
    gx, ggates, glam, gu = load_extension().backward(grad_y, x, gates, lam, u, state, chunk_size)
    return gx, ggates, glam, gu


@propagate_backward.register_fake
def _(grad_y, x, gates, lam, u, state, chunk_size):
    gu = torch.empty_like(u) if u is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(gates), torch.empty_like(lam), gu


def _setup_context(ctx, inputs, output):
    x, gates, lam, u, chunk_size, _ = inputs
    _, state = output
    ctx.save_for_backward(x, gates, lam, u, state)
    ctx.chunk_size = chunk_size
    # The state output gets no gradient; materialised, it would be a zero-filled float32 (B, 4, C, H, W).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_state):
    x, gates, lam, u, state = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None
    if state.numel() == 0:  # the forward was told no backward would follow: rebuild the state
        _, state = propagate(x, gates, lam, u, ctx.chunk_size, True)
    gx, ggates, glam, gu = propagate_backward(grad_y.contiguous(), x, gates, lam, u, state, ctx.chunk_size)
    return gx, ggates, glam, (gu if u is not None else None), None, None


propagate.register_autograd(_backward, setup_context=_setup_context)


def _dense_per_item(t: Tensor) -> Tensor:
    """t itself when each batch item is contiguous (a view into a wider tensor is fine), else a copy.

    Decided from the shape and strides alone (no indexing), so that fake and meta tensors and empty
    batches take the same path as real ones.
    """
    item = 1  # elements of one batch item, and the stride a dense item has at each dim
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != item:
            return t.contiguous()
        item *= size
    if t.shape[0] <= 1 or t.stride(0) >= item:
        return t
    return t.contiguous()


def gspn_propagate_cuda(
    x: Tensor, gates: Tensor, lam: Tensor, u: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """Run the fused kernels on checked inputs (see ``gspn_propagate``); gates, lam and u take x's dtype.

    gates, lam and u may be views into one wider tensor (as the processor's coefficient maps are): the
    kernels read them in place as long as each batch item is contiguous.
    """
    if not x.is_cuda:
        raise ValueError(f"gspn_propagate: backend='cuda' needs CUDA tensors, got x on {x.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"gspn_propagate: the CUDA kernels take float32, float16 or bfloat16, got {x.dtype}; "
            "pass backend=\"reference\" for other dtypes"
        )
    gates, lam = (_dense_per_item(t.to(x.dtype)) for t in (gates, lam))
    u = None if u is None else _dense_per_item(u.to(x.dtype))
    x = x.contiguous()
    chunk = _GLOBAL if chunk_size is None else chunk_size
    needs_state = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gates, lam, u)
    )
    if needs_state or torch.compiler.is_compiling() or type(x) is not Tensor:
        y, _ = propagate(x, gates, lam, u, chunk, needs_state)
    else:
        # No gradient and no tracing: the registered op would only add its dispatch (torch.library's
        # Python round trip) before calling the same kernels.
        y, _ = _launch_forward(x, gates, lam, u, chunk, False)
    return y
