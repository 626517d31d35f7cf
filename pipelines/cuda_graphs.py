"""CUDA-graph replay of the UNet calls whose host enqueue, not the GPU, bounds them.

A full SDXL UNet forward launches about 2,700 kernels. On one H200 at 1024^2 (CFG batch 2, float16) the
host takes 78-95 ms to enqueue them while they run ~42 ms on the GPU; at 2048^2 the GPU work (~130-150
ms) only just exceeds the enqueue. Replaying a captured ``torch.cuda.CUDAGraph`` launches the whole
forward at once, so up to 2K images a denoising step costs its GPU time. Above that the GPU bounds the
step: a graph would save little and would keep the forward's working memory in a private pool.

``GraphedCalls`` wraps any function of tensors; ``eager_reason`` says when the pipeline's UNet calls
run eagerly instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Latent pixels (h * w, any batch) of the largest UNet call replayed from a graph: 2048^2 images, the
# largest whose GPU time (~150 ms a CFG step on an H200) is near the host's ~80-100 ms enqueue.
MAX_GRAPHED_LATENT_PIXELS = 256 * 256

# Values that are compared by value in a signature; any other non-tensor argument by identity.
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _flatten(value, tensors: list, constants: list):
    """A hashable description of ``value`` (tensors by shape, dtype and device; immutable values by
    value; other objects by identity), appending its tensors and non-tensor leaves in order."""
    if isinstance(value, Tensor):
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if type(value) is dict:
        return ("dict", tuple((key, _flatten(item, tensors, constants)) for key, item in value.items()))
    if type(value) in (list, tuple):
        return (type(value), tuple(_flatten(item, tensors, constants) for item in value))
    constants.append(value)
    if isinstance(value, _IMMUTABLE):
        return ("value", type(value), value)
    return ("object", id(value))


def _rebuild(spec, tensors, constants):
    """The inverse of ``_flatten``: the structure of ``spec`` with leaves taken from the two iterators."""
    kind = spec[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "dict":
        return {key: _rebuild(item, tensors, constants) for key, item in spec[1]}
    if kind in (list, tuple):
        return kind(_rebuild(item, tensors, constants) for item in spec[1])
    return next(constants)


def signature(arguments: dict) -> tuple[tuple, list[Tensor], list]:
    """(key, tensors, non-tensor leaves) of keyword ``arguments``; calls with equal keys share a graph.

    The key holds the structure of the arguments (nested dicts, lists and tuples), each tensor's shape,
    dtype and device, each immutable value (None, numbers, strings, dtypes, devices) and the identity of
    any other object. Tensor values and strides are not in it: they are copied into the graph's inputs.
    """
    tensors, constants = [], []
    return _flatten(arguments, tensors, constants), tensors, constants


class _Graph:
    __slots__ = ("graph", "inputs", "outputs", "output_spec", "output_constants", "constants")


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # One stream per device for every warm-up and capture: cuBLAS keeps a workspace per stream, set up
    # by the warm-up and then reused by the capture (never allocated inside a graph's pool).
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class GraphedCalls:
    """``fn(**arguments)`` replayed from one CUDA graph per argument signature (``signature``).

    ``fn`` takes keyword arguments: CUDA tensors of one device (also inside dicts, lists and tuples) and
    values fixed per graph (None, numbers, modules, ...); it returns tensors (a tensor, or dicts, lists
    and tuples of them). It must read no tensor value on the host (``.item()``, ``bool(tensor)``, data-
    dependent shapes) and launch no collective; Python state it sets while being captured is what every
    replay of that graph does. Calls run without autograd (inference only).

    The first call of a signature copies the tensors into static input buffers, runs ``fn`` on them once
    on a side stream (the warm-up: lazy initialisation such as cuBLAS workspaces, extension builds and
    per-shape caches happens there, outside the capture), returns that result, and captures ``fn`` on
    the same stream (PyTorch's whole-network capture recipe). Later calls copy their tensors into the
    static inputs, replay the graph and return clones of its static outputs. All graphs of one
    ``GraphedCalls`` share one memory pool: each replay's outputs are cloned before the next replay.

    ``release()`` (or leaving ``with GraphedCalls(fn) as calls:``) drops the graphs and returns their
    pool's memory to the device. A graph replays the modules as they were at capture: release before
    changing them (weights replaced, processors swapped).
    """

    def __init__(self, fn):
        self.fn = fn
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    def __len__(self) -> int:
        """Graphs captured (one per signature seen)."""
        return len(self._graphs)

    def __enter__(self) -> "GraphedCalls":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __call__(self, **arguments):
        key, tensors, constants = signature(arguments)
        devices = {t.device for t in tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedCalls needs tensor arguments on one CUDA device; got {sorted(map(str, devices))}")
        with torch.no_grad():
            entry = self._graphs.get(key)
            if entry is None:
                return self._capture(key, tensors, constants)
            for static, tensor in zip(entry.inputs, tensors):
                static.copy_(tensor)
            entry.graph.replay()
            return _rebuild(entry.output_spec, (o.clone() for o in entry.outputs), iter(entry.output_constants))

    def _capture(self, key, tensors: list[Tensor], constants: list):
        device = tensors[0].device
        current = torch.cuda.current_stream(device)
        stream = _side_stream(device)
        entry = _Graph()
        entry.constants = constants  # keeps objects keyed by identity alive while their graph exists
        entry.inputs = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in tensors]
        for static, tensor in zip(entry.inputs, tensors):
            static.copy_(tensor)

        def call():
            return self.fn(**_rebuild(key, iter(entry.inputs), iter(constants)))

        with torch.cuda.device(device):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                result = call()
            current.wait_stream(stream)
            result_tensors, result_constants = [], []
            _flatten(result, result_tensors, result_constants)
            if any(c is not None for c in result_constants):
                raise TypeError("GraphedCalls: fn must return tensors (in dicts, lists or tuples)")
            for tensor in result_tensors:
                tensor.record_stream(current)  # made on the side stream, used on the caller's
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a process group's watchdog) leave the capture valid.
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                captured = call()
        entry.graph = graph
        entry.outputs, entry.output_constants = [], []
        entry.output_spec = _flatten(captured, entry.outputs, entry.output_constants)
        self._graphs[key] = entry
        return result

    def release(self) -> None:
        """Drop every graph and return their memory pool to the device."""
        if not self._graphs:
            return
        self._graphs.clear()
        self._pool = None
        torch.cuda.empty_cache()  # a released pool's memory is otherwise kept until the next empty_cache


def has_offload_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule carries accelerate or diffusers hooks (CPU offload, group
    offload, layerwise casting, caches): they move or cast weights around each forward, which a replay
    would skip."""
    return any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in module.modules())


def eager_reason(sample: Tensor, timestep, *, cross_attention_kwargs=None, image_embeds=None) -> str | None:
    """Why the UNet call on ``sample`` (B, c, h, w) at ``timestep`` runs eagerly, or None when it is
    replayed from a CUDA graph: a CUDA sample of at most ``MAX_GRAPHED_LATENT_PIXELS`` latent pixels, a
    0-dim timestep tensor on its device (copied into the graph's input; a Python number would be baked
    in), no ``cross_attention_kwargs`` and no IP-Adapter ``image_embeds`` (those keep the eager path)."""
    if sample.device.type != "cuda":
        return f"the sample is on {sample.device}, not a CUDA device"
    if sample.shape[-2] * sample.shape[-1] > MAX_GRAPHED_LATENT_PIXELS:
        return f"a {sample.shape[-2]}x{sample.shape[-1]} latent is large enough for the GPU to bound its call"
    if not (isinstance(timestep, Tensor) and timestep.ndim == 0 and timestep.device == sample.device):
        return "the timestep is not a 0-dim tensor on the sample's device"
    if cross_attention_kwargs:
        return "cross_attention_kwargs are given"
    if image_embeds is not None:
        return "IP-Adapter image embeddings are given"
    return None
