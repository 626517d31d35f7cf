"""SDXL VAE decode time, peak memory and output change for each way of running it (``vae_tiling.TUNING``).

    python benchmarks/bench_vae.py                          # full SDXL VAE, bfloat16, CUDA: 4K and 16K
    python benchmarks/bench_vae.py --sizes 4096             # tiled decodes at these sizes (pixels, square)
    python benchmarks/bench_vae.py --tiny                   # CPU smoke run of the same code, tiny VAE

Random weights (SDXL's VAE config shipped in gspn_diffusers/configs), in the pipeline's compute dtype for
SDXL's VAE (bfloat16 on CUDA: the config has force_upcast), batch 1, under ``torch.inference_mode``.
Variants (``Tuning`` fields and tile size; ``current`` is every setting off, 1024 px tiles):

    current                   the decode as it is
    cudnn-benchmark           cuDNN times its convolution algorithms per shape
    affine-norm               GroupNorm as one pass x * scale + shift (four passes and nn.GroupNorm now)
    channels-last             + the decoder's weights and inputs in channels_last
    channels-last+benchmark   both
    <best>+sdpa               the fastest of the above, keys and values of the context projected once per
                              decode, then F.scaled_dot_product_attention
    <best>+matmul             the same keys and values, attention as matmuls with float32 scores
    <best>, tile 1536 / 2048  the fastest so far with larger tiles (fewer tiles and less overlap at 16K)

Each variant: (a) one decoder pass over a whole 128^2 and 256^2 latent as a context pass runs (a 1024 px
tile and the 2048 px context), (b) the tiled decode (``decode_tiled``, grid ``planning.vae_grid``, context
``planning.VAE_CONTEXT_PIXELS``) at each size. Times are CUDA events after one warm-up call (the warm-up's
own time is reported too: it includes cuDNN's algorithm search). Peak: GiB allocated during the call
beyond what was allocated before it (the weights, kept images), the output image included. The largest
size (16K, ~25 s with the current decode) runs once, for ``current`` and the ``--top`` variants with the
lowest predicted time there (context pass plus the tiles, each at its 4K rate). "diff": max and mean
|difference| of the float32 image from ``current``'s at that size; the row ``untiled`` is one decode of
the whole 4K latent without tiles, against ``current``: the error tiling itself makes, for scale.

Also: the tiles' attention alone (16384 queries of a 1024 px tile against the 65536 tokens of the 2048 px
context, one 512-wide head) per SDPA backend and as float32-score matmuls, with the error against float64 on
the first queries; ``--profile``: the kernels of a 4-tile decode for ``current`` and the fastest variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from gspn_diffusers.pipelines import vae_tiling
from gspn_diffusers.pipelines.planning import VAE_CONTEXT_PIXELS, vae_grid
from gspn_diffusers.pipelines.vae_tiling import Tuning, decode_tiled
from gspn_diffusers.testing import sdxl_config, tiny_vae_config

FACTOR = 8  # SDXL's VAE: 8 pixels per latent pixel
FULL = dict(sizes=(4096, 16384), plain=(1024, 2048), tile=1024, larger_tiles=(1536, 2048),
            context=VAE_CONTEXT_PIXELS)
# The tiny VAE on the CPU: the same code at an eighth of the sizes.
TINY = dict(sizes=(256, 512), plain=(128, 256), tile=128, larger_tiles=(192, 256), context=VAE_CONTEXT_PIXELS // 8)
BASE_VARIANTS = {
    "current": Tuning(),
    "cudnn-benchmark": Tuning(cudnn_benchmark=True),
    "affine-norm": Tuning(affine_norm=True),
    "channels-last": Tuning(affine_norm=True, channels_last=True),
    "channels-last+benchmark": Tuning(affine_norm=True, channels_last=True, cudnn_benchmark=True),
}


@dataclass
class Variant:
    name: str
    tuning: Tuning
    tile: int  # pixels


@contextmanager
def tuned(tuning: Tuning):
    saved, vae_tiling.TUNING = vae_tiling.TUNING, tuning
    try:
        yield
    finally:
        vae_tiling.TUNING = saved


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    """(seconds, result) of fn(): CUDA events on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


def reset_peak(device) -> int:
    """Free what is unused and start a new peak; the bytes allocated now (weights, kept images)."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_gib(device, baseline: int) -> float | None:
    """GiB allocated at the peak since ``reset_peak`` beyond what was allocated then (its ``baseline``)."""
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30 if device.type == "cuda" else None


def latents_for(pixels: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """(1, 4, n, n) latents, n = pixels / 8: smooth noise with ramps in mean and contrast, so that tiles differ."""
    n = pixels // FACTOR
    g = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.randn(1, 4, max(2, n // 8), max(2, n // 8), generator=g).to(device)
    z = F.interpolate(coarse, size=(n, n), mode="bilinear", align_corners=False)
    ramp = torch.linspace(-1.5, 1.5, n, device=device)
    z = z * (1 + 0.5 * ramp.view(1, 1, -1, 1).abs()) + ramp.view(1, 1, 1, -1) * torch.tensor(
        [1.0, -1.0, 0.5, 0.25], device=device).view(1, 4, 1, 1)
    return (2.0 * z).to(dtype)


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()
    return d.max().item(), d.mean().item()


def tiled_decode(vae, z, tile: int, context: int):
    n = z.shape[-1]
    grid = vae_grid(n, n, tile // FACTOR)
    return decode_tiled(vae, z, grid, context // FACTOR), 1 if grid is None else len(grid)


def context_pass(vae, z: torch.Tensor) -> torch.Tensor:
    """The decoder on all of z in one pass, run as a tiled decode runs its context pass (``TUNING``'s layout,
    norms and attention); an untiled ``decode_tiled`` is never tuned."""
    with vae_tiling._tuned([m for m in (vae.post_quant_conv, vae.decoder) if m is not None]):
        whole = vae_tiling.WholeImageContext(vae.decoder)
        with whole.installed():
            whole.mode = "record"
            return vae_tiling._decoder(vae)(vae_tiling._laid_out(z)).float()


def plain_cells(vae, variant: Variant, sizes, device, dtype, repeats: int) -> dict:
    """Seconds (median after a warm-up) and peak GiB of one context pass (``context_pass``) per size."""
    cells = {}
    with tuned(variant.tuning):
        for pixels in sizes:
            z = latents_for(pixels, device, dtype)
            try:
                warm, _ = timed(lambda: context_pass(vae, z), device)
                baseline = reset_peak(device)
                times = sorted(timed(lambda: context_pass(vae, z), device)[0] for _ in range(repeats))
                cells[pixels] = dict(s=times[(len(times) - 1) // 2], warmup_s=warm, peak_gib=peak_gib(device, baseline))
            except torch.OutOfMemoryError:
                cells[pixels] = dict(oom=True)
            reset_peak(device)
    return cells


def tiled_cell(vae, variant: Variant, pixels: int, context: int, device, dtype, reference, warm_up: bool) -> dict:
    """One tiled decode at ``pixels`` (after a warm-up call when asked): seconds, peak, tiles, difference."""
    z = latents_for(pixels, device, dtype)
    cell = dict(variant=variant.name, size=pixels, tile=variant.tile, tuning=asdict(variant.tuning))
    try:
        with tuned(variant.tuning):
            if warm_up:
                cell["warmup_s"], _ = timed(lambda: tiled_decode(vae, z, variant.tile, context), device)
            baseline = reset_peak(device)
            seconds, (image, tiles) = timed(lambda: tiled_decode(vae, z, variant.tile, context), device)
        cell.update(s=seconds, peak_gib=peak_gib(device, baseline), tiles=tiles)
        if reference is not None:
            cell["max_diff"], cell["mean_diff"] = difference(image, reference)
        return cell, image
    except torch.OutOfMemoryError:
        cell["oom"] = True
        return cell, None
    finally:
        reset_peak(device)


def untiled_cell(vae, pixels, device, dtype, reference) -> dict:
    """The whole latent decoded in one go with the current tuning: how far tiling itself is from it."""
    z = latents_for(pixels, device, dtype)
    cell = dict(variant="untiled", size=pixels, tile=None, tuning=asdict(Tuning()))
    baseline = reset_peak(device)
    try:
        with tuned(Tuning()):
            seconds, image = timed(lambda: decode_tiled(vae, z, None, pixels // FACTOR), device)
        cell.update(s=seconds, peak_gib=peak_gib(device, baseline), tiles=1)
        cell["max_diff"], cell["mean_diff"] = difference(image, reference)
        del image
    except torch.OutOfMemoryError:
        cell["oom"] = True
    reset_peak(device)
    return cell


def predicted_seconds(cell: dict, plain: dict, pixels: int, context_pixels: int, tile: int) -> float:
    """Time at ``pixels`` from a tiled decode at a smaller size: the context pass (the plain decode at the
    context size) plus as many tiles as the grid at ``pixels`` has, each at the measured rate per tile."""
    context = plain.get(context_pixels, {}).get("s", 0.0)
    per_tile = max(cell["s"] - context, 0.0) / cell["tiles"]
    grid = vae_grid(pixels // FACTOR, pixels // FACTOR, tile // FACTOR)
    return context + per_tile * (1 if grid is None else len(grid))


def attention_cells(device, dtype, queries: int, keys: int, width: int, check_rows: int = 256) -> list[dict]:
    """The tiles' context attention alone, (1, 1, queries, width) against (1, 1, keys, width): time per
    call (median of 3 after a warm-up) and max |error| on the first ``check_rows`` queries vs float64."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, width, generator=g).to(device, dtype) for n in (queries, keys, keys))
    scaled_k = (k.float() * width**-0.5).to(dtype)
    truth = torch.softmax(q[..., :check_rows, :].double() @ k.double().transpose(-1, -2) * width**-0.5, -1)
    truth = (truth @ v.double()).float()
    methods = {"sdpa (default)": lambda: F.scaled_dot_product_attention(q, k, v)}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        SDPBackend = None
    if SDPBackend is not None:
        for name in ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is not None:
                def run(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v)
                methods[f"sdpa {name.lower()}"] = run
    methods["matmul, float32 scores"] = lambda: vae_tiling._matmul_attention(q, scaled_k, v)
    flops = 4 * queries * keys * width
    cells = []
    for name, fn in methods.items():
        cell = dict(method=name, queries=queries, keys=keys, width=width)
        try:
            timed(fn, device)
            times = sorted(timed(fn, device)[0] for _ in range(3))
            out = fn()
            cell.update(ms=times[1] * 1e3, tflops=flops / times[1] / 1e12,
                        max_err=(out[..., :check_rows, :].float() - truth).abs().max().item())
        except (RuntimeError, torch.OutOfMemoryError) as error:
            cell["error"] = str(error).splitlines()[0][:80]
        cells.append(cell)
        reset_peak(device)
    return cells


def profile_tiles(vae, variant: Variant, device, dtype, rows: int = 14) -> str:
    """Kernel table (self device time) of a decode of 4 tiles of ``variant.tile`` px, after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    pixels = 2 * variant.tile - 2 * FACTOR * 8
    z = latents_for(pixels, device, dtype)
    with tuned(variant.tuning):
        tiled_decode(vae, z, variant.tile, pixels)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            tiled_decode(vae, z, variant.tile, pixels)
            sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        return events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):
        return events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)


def build_vae(tiny: bool, device, dtype) -> AutoencoderKL:
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**(tiny_vae_config() if tiny else sdxl_config("vae")))
    # nn.Module.to: ModelMixin.to warns about float32 modules on every cast
    torch.nn.Module.to(vae, dtype=dtype)
    return vae.eval().requires_grad_(False)


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_tiled_table(cells: list[dict], plain: dict, spec: dict) -> None:
    plain_sizes = spec["plain"]
    print(f"\n{'variant':<34} {'tile':>5} {'size':>6} {'tiles':>5} {'s':>8} {'warm-up s':>9} {'peak GiB':>8} "
          f"{'max diff':>9} {'mean diff':>9} | plain " + " ".join(f"{p} px s (peak)" for p in plain_sizes))
    for cell in cells:
        name = cell["variant"]
        plains = plain.get(name, {})
        plain_text = " ".join(
            "OOM" if plains.get(p, {}).get("oom") else
            f"{fmt(plains.get(p, {}).get('s'), '.4f'):>8} ({fmt(plains.get(p, {}).get('peak_gib'), '.2f')})"
            for p in plain_sizes) if plains else ""
        if cell.get("oom"):
            print(f"{name:<34} {fmt(cell['tile'], 'd'):>5} {cell['size']:>6} OOM")
            continue
        print(f"{name:<34} {fmt(cell['tile'], 'd'):>5} {cell['size']:>6} {cell['tiles']:>5} {cell['s']:>8.3f} "
              f"{fmt(cell.get('warmup_s'), '.3f'):>9} {fmt(cell.get('peak_gib'), '.2f'):>8} "
              f"{fmt(cell.get('max_diff'), '.2e'):>9} {fmt(cell.get('mean_diff'), '.2e'):>9} | {plain_text}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny VAE on CPU, float32 (a smoke run)")
    parser.add_argument("--sizes", nargs="+", type=int, help="tiled decode sizes, pixels (square); the last runs "
                        "for current and the --top variants only")
    parser.add_argument("--variants", nargs="+", choices=list(BASE_VARIANTS), default=list(BASE_VARIANTS),
                        help="the variants to run before the attention and tile ones (current always runs)")
    parser.add_argument("--top", type=int, default=2, help="variants besides current at the largest size")
    parser.add_argument("--plain-repeats", type=int, default=3)
    parser.add_argument("--no-attention", action="store_true", help="skip the attention-only timings")
    parser.add_argument("--profile", action="store_true", help="kernel tables of current and the fastest variant")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    spec = TINY if args.tiny else FULL
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    else:
        sys.exit("bench_vae.py needs a CUDA GPU for the full VAE; use --tiny for a CPU smoke run")
    sizes = sorted(args.sizes or spec["sizes"])
    small, largest = sizes[:-1], sizes[-1]
    context = spec["context"]

    vae = build_vae(args.tiny, device, dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    print(f"SDXL VAE{' (tiny)' if args.tiny else ''} decode, {device_name}, {dtype}, torch {torch.__version__}, "
          f"cuDNN {cudnn}; context {context} px; tiles {spec['tile']} px unless said")
    results = dict(device=device_name, dtype=str(dtype), torch=torch.__version__, cudnn=cudnn, context_pixels=context,
                   tiled=[], plain={}, attention=[], predicted={})

    if not args.no_attention:
        tile_tokens, context_tokens = (spec["tile"] // FACTOR) ** 2, (context // FACTOR) ** 2
        width = vae.config.block_out_channels[-1]
        results["attention"] = attention_cells(device, dtype, tile_tokens, context_tokens, width)
        print(f"\ntile attention alone: {tile_tokens} queries x {context_tokens} keys, one head of {width}")
        for cell in results["attention"]:
            if "error" in cell:
                print(f"  {cell['method']:<28} unavailable: {cell['error']}")
            else:
                print(f"  {cell['method']:<28} {cell['ms']:9.2f} ms {cell['tflops']:7.1f} TFLOP/s "
                      f"max err {cell['max_err']:.2e}", flush=True)

    names = ["current"] + [n for n in args.variants if n != "current"]
    variants = [Variant(n, BASE_VARIANTS[n], spec["tile"]) for n in names]
    references, images, measured = {}, {}, {}

    def run_variant(variant: Variant) -> None:
        results["plain"][variant.name] = plain_cells(vae, variant, spec["plain"], device, dtype, args.plain_repeats)
        for index, pixels in enumerate(small):
            cell, image = tiled_cell(vae, variant, pixels, context, device, dtype, references.get(pixels),
                                     warm_up=index == 0)
            if variant.name == "current" and image is not None:
                references[pixels] = image
            del image
            results["tiled"].append(cell)
            if index == 0 and not cell.get("oom"):
                measured[variant.name] = (variant, cell)  # ranked by the smallest size
        print_tiled_table([c for c in results["tiled"] if c["variant"] == variant.name], results["plain"], spec)

    def fastest() -> Variant:
        return min((v for v, _ in measured.values()), key=lambda v: measured[v.name][1]["s"])

    for variant in variants:
        run_variant(variant)
    if small:
        best = fastest()
        for how in ("sdpa", "matmul"):
            run_variant(Variant(f"{best.name}+{how}", replace(best.tuning, context_attention=how), best.tile))
        best = fastest()
        for tile in spec["larger_tiles"]:
            run_variant(Variant(f"{best.name}, tile {tile}", best.tuning, tile))
        for pixels in small:
            if pixels in references and pixels <= 4096:
                results["tiled"].append(untiled_cell(vae, pixels, device, dtype, references[pixels]))

    # The largest size: current, then the variants predicted fastest there.
    if small:
        for name, (variant, cell) in measured.items():
            if cell["tiles"] > 1:  # one tile is an untiled decode: no rate per tile to scale
                results["predicted"][name] = predicted_seconds(cell, results["plain"][name], largest, context,
                                                               variant.tile)
        ranked = sorted((n for n in results["predicted"] if n != "current"), key=results["predicted"].get)
        chosen = ["current"] + ranked[:args.top]
        print(f"\npredicted at {largest} px (context pass + tiles at the {small[0]} px rate): " + ", ".join(
            f"{n} {results['predicted'][n]:.1f} s" for n in ["current"] + ranked))
    else:
        chosen = [v.name for v in variants[:1 + args.top]]
        measured = {v.name: (v, None) for v in variants}
    for name in chosen:
        variant = measured[name][0]
        cell, image = tiled_cell(vae, variant, largest, context, device, dtype, images.get(largest),
                                 warm_up=not small)
        if name == "current" and image is not None:
            images[largest] = image
        del image
        results["tiled"].append(cell)
        print_tiled_table([cell], {}, spec)

    print("\nall tiled decodes (s: one decode after warm-up; diff: float32 image vs current at that size)")
    print_tiled_table(results["tiled"], results["plain"], spec)
    if "current" in measured and small:
        scale = references[small[0]].abs().mean().item()
        print(f"(current's image at {small[0]} px: mean |value| {scale:.3f})")

    if args.profile and small:
        for variant in (measured["current"][0], fastest()):
            table = profile_tiles(vae, variant, device, dtype)
            results.setdefault("profiles", {})[variant.name] = table
            print(f"\nkernels of a 4-tile decode, {variant.name} (tile {variant.tile} px):\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
