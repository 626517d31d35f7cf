"""SDXL UNet forward time and peak memory: softmax self-attention, GSPN-2, and no self-attention.

    python benchmarks/bench_unet.py                      # full SDXL UNet, float16, CUDA, 1K-8K
    python benchmarks/bench_unet.py --sizes 4096 8192    # some sizes (pixels; WxH for non-square)
    python benchmarks/bench_unet.py --tiny               # CPU smoke run of the same code, tiny UNet
    python benchmarks/bench_unet.py --sizes 1024 2048 --variants softmax softmax-graph gspn-fused gspn-fused-graph

Random weights (the SDXL base config shipped in gspn_diffusers/configs), CFG batch 2, one UNet forward
per sample under ``torch.inference_mode``. Variants, one model (the first four by default):

    softmax     diffusers' default self-attention processor (SDPA)
    gspn        GSPNAdapter.for_unet(unet) mounted (gspn_propagate, backend "auto")
    gspn-fused  the same after adapter.fuse_projections(): up folded into each layer's to_out[0]
    floor       every attn1 returns zeros: the rest of the UNet alone, the floor any replacement of
                self-attention can reach
    NAME-graph  (CUDA) variant NAME replayed from a CUDA graph, as the pipeline runs host-bound sizes
                (pipelines/cuda_graphs.py's GraphedCalls): the warm-up call captures the forward, every
                timed call copies the inputs in, replays, and clones the output; ratios are to floor-graph
                when it is measured

Times are medians (CUDA events on GPU) after one warm-up call; the number of timed calls adapts to
``--budget-s`` so that the slow cells (softmax at 8K is ~16 s a call) stay few. Peak memory is
``torch.cuda.max_memory_allocated`` over the warm-up and timed calls (a graph's memory is allocated
when it is captured, in the warm-up), weights included. A cell that runs out of memory prints OOM.
``host`` is the wall-clock time the call takes to return (to enqueue its kernels, or its replay) in
the median call: when it is close to the GPU time, the forward is bound by the host, not the GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
from diffusers import UNet2DConditionModel

from gspn_diffusers import GSPNAdapter, gspn_propagate
from gspn_diffusers.adapter import self_attention_layers
from gspn_diffusers.pipelines.cuda_graphs import GraphedCalls
from gspn_diffusers.testing import sdxl_config, tiny_unet_config

DEFAULT_VARIANTS = ("softmax", "gspn", "gspn-fused", "floor")
GRAPH_SUFFIX = "-graph"
VARIANTS = DEFAULT_VARIANTS + tuple(v + GRAPH_SUFFIX for v in DEFAULT_VARIANTS)
FULL_SIZES = ("1024", "2048", "4096", "8192")
TINY_SIZES = ("256", "384x256")
TEXT_TOKENS = 77


class NoSelfAttnProcessor:
    """attn1 removed: returns zeros of the attention output's shape (the block adds them to its input)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], attn.out_dim)


def parse_size(text: str) -> tuple[int, int]:
    """'4096' -> (4096, 4096); '1536x640' -> (height 640, width 1536). Pixels, multiples of 8."""
    width, _, height = text.partition("x")
    size = (int(height or width), int(width))
    if size[0] % 8 or size[1] % 8:
        raise argparse.ArgumentTypeError(f"sizes must be multiples of 8 pixels, got {text}")
    return size


def unet_inputs(config: dict, batch: int, size: tuple[int, int], device, dtype) -> dict:
    """Random SDXL conditioning for a (height, width)-pixel image: latents are 8x smaller."""
    height, width = size
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    time_ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
    def noise(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    return dict(
        sample=noise(batch, config["in_channels"], height // 8, width // 8),
        timestep=torch.tensor(999, device=device),
        encoder_hidden_states=noise(batch, TEXT_TOKENS, config["cross_attention_dim"]),
        added_cond_kwargs=dict(
            text_embeds=noise(batch, text_dim),
            time_ids=time_ids.expand(batch, 6),
        ),
    )


@contextmanager
def variant(name: str, unet, adapter: GSPNAdapter):
    """The UNet with its attn1 processors set for one variant; the originals are back afterwards."""
    if name == "softmax":
        yield
    elif name in ("gspn", "gspn-fused"):
        if name == "gspn-fused":
            adapter.fuse_projections()
        try:
            with adapter.mounted(unet):
                yield
        finally:
            adapter.unfuse_projections()
    else:
        originals = unet.attn_processors
        removed = {layer + ".processor" for layer in self_attention_layers(unet)}
        unet.set_attn_processor({k: NoSelfAttnProcessor() if k in removed else p for k, p in originals.items()})
        try:
            yield
        finally:
            unet.set_attn_processor(originals)


def elapsed_ms(fn, device: torch.device) -> tuple[float, float]:
    """(ms from start to end of the work, ms until ``fn`` returned on the host)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        fn()
        host = (time.perf_counter() - begin) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host
    begin = time.perf_counter()
    fn()
    host = (time.perf_counter() - begin) * 1e3
    return host, host


def measure(fn, device: torch.device, budget_s: float, max_repeats: int) -> tuple[float, float, float | None, int]:
    """(median ms, host ms of that call, peak GiB or None off CUDA, timed calls) after one warm-up call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup, _ = elapsed_ms(fn, device)
    repeats = max(1, min(max_repeats, int(budget_s * 1e3 / max(warmup, 1e-3))))
    samples = sorted(elapsed_ms(fn, device) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ms, host = samples[(len(samples) - 1) // 2]
    return ms, host, peak, repeats


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_cell(unet, adapter, name, inputs, device, args) -> dict:
    graphed = name.endswith(GRAPH_SUFFIX)
    try:
        with variant(name.removesuffix(GRAPH_SUFFIX), unet, adapter), \
                (GraphedCalls(lambda **kw: unet(**kw).sample) if graphed else nullcontext(unet)) as forward:
            ms, host, peak, repeats = measure(lambda: forward(**inputs), device, args.budget_s, args.max_repeats)
        return dict(ms=ms, host_ms=host, peak_gib=peak, repeats=repeats)
    except torch.OutOfMemoryError:
        return dict(oom=True)
    finally:
        free_memory(device)


def format_cell(cell: dict | None, floor: dict | None) -> str:
    if cell is None:
        return "-"
    if cell.get("oom"):
        return "OOM"
    text = f"{cell['ms']:.1f} ms"
    if floor and not floor.get("oom"):
        text += f" ({cell['ms'] / floor['ms']:.2f}x)"
    return text


def format_peak(cell: dict | None) -> str:
    if cell is None:
        return "-"
    if cell.get("oom"):
        return "OOM"
    return "n/a" if cell["peak_gib"] is None else f"{cell['peak_gib']:.2f}"


def format_host(cell: dict | None) -> str:
    if cell is None or cell.get("oom"):
        return "-"
    return f"{cell['host_ms']:.1f}"


def print_line(label: str, times: list[str], hosts: list[str], peaks: list[str], variants) -> None:
    width = max(16, *(len(f"peak {v}") for v in variants))
    columns = [f"{label:>11}", *(f"{t:>20}" for t in times), " ".join(f"{h:>{width}}" for h in hosts),
               " ".join(f"{p:>{width}}" for p in peaks)]
    print(" | ".join(columns), flush=True)


def floor_of(name: str, cells: dict) -> dict | None:
    """The cell ``name``'s time is compared to: floor-graph for graph variants when measured, else floor."""
    floor = cells.get("floor")
    if name.endswith(GRAPH_SUFFIX):
        floor = cells.get("floor" + GRAPH_SUFFIX, floor)
    return None if name.startswith("floor") else floor


def print_row(size, cells: dict, variants) -> None:
    times = [format_cell(cells.get(v), floor_of(v, cells)) for v in variants]
    print_line(f"{size[1]}x{size[0]}", times, [format_host(cells.get(v)) for v in variants],
               [format_peak(cells.get(v)) for v in variants], variants)


def load_gspn_backend(device, dtype) -> float:
    """Run gspn_propagate once on a tiny input (builds or loads the CUDA extension); seconds taken."""
    begin = time.perf_counter()
    options = dict(device=device, dtype=dtype)
    x = torch.randn(1, 8, 4, 4, **options)
    gspn_propagate(x, torch.zeros(1, 4, 3, 1, 4, 4, **options), torch.ones(1, 4, 8, 4, 4, **options))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def build(args, device, dtype):
    config = tiny_unet_config() if args.tiny else sdxl_config("unet")
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if dtype == torch.float16:
        unet = unet.half()  # not .to(dtype): ModelMixin.to warns about float32 modules it does not have
    unet = unet.eval().requires_grad_(False)
    adapter = GSPNAdapter.for_unet(
        unet, proxy_ratio=args.proxy_ratio, gate_groups=args.gate_groups, chunk_size=args.chunk_size
    )
    return config, unet, adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on CPU, float32 (a smoke run)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, help="image sizes in pixels: 4096 or WxH")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    parser.add_argument("--proxy-ratio", type=int, default=8)
    parser.add_argument("--gate-groups", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None, help="GSPN local propagation (default global)")
    parser.add_argument("--budget-s", type=float, default=8.0, help="time to spend on timed calls per cell")
    parser.add_argument("--max-repeats", type=int, default=10)
    args = parser.parse_args(argv)

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.float16
    else:
        sys.exit("bench_unet.py needs a CUDA GPU for the full UNet; use --tiny for a CPU smoke run")
    if device.type != "cuda" and any(v.endswith(GRAPH_SUFFIX) for v in args.variants):
        parser.error("the -graph variants replay CUDA graphs: they need a CUDA GPU")
    sizes = args.sizes or [parse_size(s) for s in (TINY_SIZES if args.tiny else FULL_SIZES)]

    torch.manual_seed(0)
    config, unet, adapter = build(args, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"SDXL UNet{' (tiny)' if args.tiny else ''}, {name}, {dtype}, batch {args.batch}; "
        f"GSPN: proxy 1/{args.proxy_ratio}, {args.gate_groups} gate group(s), "
        f"chunk {args.chunk_size or 'global'}, {len(adapter.processors)} attn1 layers"
    )
    print(f"gspn_propagate backend ready in {load_gspn_backend(device, dtype):.1f} s")
    print("time: median of a UNet forward (ratio to floor); host: ms until that call returned (enqueued); "
          "peak: GiB allocated, weights included")
    print_line("size", args.variants, [f"host {v}" for v in args.variants], [f"peak {v}" for v in args.variants],
               args.variants)
    with torch.inference_mode():
        for size in sizes:
            inputs = unet_inputs(config, args.batch, size, device, dtype)
            cells = {v: run_cell(unet, adapter, v, inputs, device, args) for v in args.variants}
            del inputs
            print_row(size, cells, args.variants)


if __name__ == "__main__":
    main()
