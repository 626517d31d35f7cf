"""The collectives a plan needs to run over the processes of ``torch.distributed``.

The process group is started by ``accelerate launch`` or ``torchrun`` (NCCL on GPUs, gloo on CPU)
before the pipeline runs; every process holds the whole pipeline on its own device (accelerate's
``PartialState().device``), runs the same call with the same arguments, and does the units of work
the plan gives it. Without an initialised process group everything here is a no-op for one process.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def process() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return process()[0] == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if process()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree(value: int, device: torch.device, op: str) -> int:
    """The "min" or "max" of an integer over all processes (e.g. free memory), so that every
    process plans alike; ``value`` itself in one process."""
    if process()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every process gets ``src``'s ``tensor`` (in place; same shape and dtype everywhere); returns it."""
    if process()[1] > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_tensors(tensors: dict | None, device: torch.device, src: int = 0) -> dict:
    """``src``'s dict of tensors on every process (the others pass None): shapes and dtypes go first
    as one small object, then each tensor."""
    rank, world = process()
    if world == 1:
        return tensors
    meta = [None if rank != src else {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}]
    dist.broadcast_object_list(meta, src=src, device=device if device.type == "cuda" else None)
    if rank != src:
        tensors = {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in meta[0].items()}
    for key in sorted(tensors, key=str):
        dist.broadcast(tensors[key], src=src)
    return tensors


def share_context(whole, record: Callable[[], None], device: torch.device) -> None:
    """Compute a ``vae_tiling.WholeImageContext`` once, on the main process (``record`` runs the
    context pass), and give its GroupNorm statistics and attention tokens to every process."""
    rank, world = process()
    if world == 1:
        record()
        return
    flat = None
    if rank == 0:
        record()
        flat = {("stat", k, i): t.contiguous() for k, pair in whole.statistics.items() for i, t in enumerate(pair)}
        flat.update({("tokens", k): t.contiguous() for k, t in whole.context_tokens.items()})
    flat = broadcast_tensors(flat, device)
    if rank != 0:
        keys = sorted({key[1] for key in flat if key[0] == "stat"})
        whole.statistics = {k: (flat[("stat", k, 0)], flat[("stat", k, 1)]) for k in keys}
        whole.context_tokens = {key[1]: t for key, t in flat.items() if key[0] == "tokens"}
