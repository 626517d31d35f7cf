"""The plan of one generation: its stages, how each runs the UNet, how the VAE decodes, the memory.

Decided before any work from the requested size, the batch and a memory budget, so that bad input
and sizes that cannot fit are refused at once, and so that a user can print the plan first.

Stages. Up to the base resolution (UNet sample size x VAE factor; 1024 for SDXL) in area, one stage
makes the image directly. Above it, a base stage at about the base area with the requested aspect
ratio, then upscale stages, each at most x2 per side (equal factors; exactly x2 for power-of-two
multiples of the base), the last at exactly the requested size. Every upscale stage re-noises the
upsampled latent of the stage before to its ``strength`` and denoises it.

UNet layout of a stage, by preference: the whole latent with both CFG halves in one batch; the whole
latent with the halves one after the other (``cfg_sequential``); overlapping tiles as large as the
budget allows, halves one after the other. A forced ``tile_size`` keeps the halves batched when they fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .memory import GIB, MemoryModel
from .tiling import TileGrid
from .vae_tiling import context_shape

DEFAULT_NUM_INFERENCE_STEPS = 30
DEFAULT_UPSAMPLE_GUIDANCE = 0.5
# Intermediate sizes and tile starts are multiples of 4 latent pixels: SDXL's UNet halves the
# latent twice, so tiles then share the down-sampling phase of the whole latent.
LATENT_ALIGN = 4
MIN_TILE_LATENT = 16
# VAE tiles: 1024 pixels is the fastest per pixel of the anchors' decodes (91 ms per 1024^2 against
# 425 ms per 2048^2); tiles overlap by 16 latent pixels, 4 of them weightless margin. The context pass
# decodes the whole latent downscaled to at most 2048 pixels a side (425 ms, 9.7 GiB in float16).
VAE_TILE_PIXELS = 1024
VAE_CONTEXT_PIXELS = 2048
VAE_OVERLAP_LATENT = 16
MIN_VAE_TILE_LATENT = 16


def default_strength(stage_index: int) -> float:
    """Re-noising strength of upscale stage ``stage_index`` (1, 2, ...): 0.5, 0.45, 0.4, 0.35, then 0.3.

    Each x2 stage only has to add the detail of one octave, so later (larger) stages keep more of
    what they are given, which also keeps the UNet from inventing new objects inside big images.
    """
    return max(0.3, 0.55 - 0.05 * stage_index)


@dataclass(frozen=True)
class StagePlan:
    """One denoising stage.

    Attributes:
        index: 0 for the base stage.
        height, width: image pixels of this stage.
        strength: 1.0 for the base stage (from pure noise); the re-noising strength otherwise.
        steps: denoising steps this stage runs.
        schedule_steps: steps of the full schedule the stage's steps are the tail of.
        upsample_guidance: weight at the stage's first step of the pull towards the upsampled previous
            latent (0 in the base stage).
        tile_size: (height, width) pixels of a UNet tile, or None for the whole latent.
        tile_overlap: pixels shared by neighbouring tiles.
        num_tiles: UNet calls per step and CFG half (1: whole latent).
        cfg_sequential: the CFG halves run one after the other instead of as one batch of 2.
        predicted_bytes: predicted working memory of the stage.
    """

    index: int
    height: int
    width: int
    strength: float
    steps: int
    schedule_steps: int
    upsample_guidance: float
    tile_size: tuple[int, int] | None
    tile_overlap: int
    num_tiles: int
    cfg_sequential: bool
    predicted_bytes: int

    def tile_grid(self, vae_factor: int) -> TileGrid | None:
        """The stage's UNet tiles over its latent, or None when it runs on the whole latent."""
        if self.tile_size is None:
            return None
        return _unet_grid(self.height // vae_factor, self.width // vae_factor,
                          (self.tile_size[0] // vae_factor, self.tile_size[1] // vae_factor))


@dataclass(frozen=True)
class Plan:
    """Stages, VAE tiling and predicted memory of one call; ``str(plan)`` is a readable table."""

    height: int
    width: int
    batch: int
    cfg: bool
    stages: tuple[StagePlan, ...]
    vae_tile_size: int | None
    vae_context_size: int
    vae_overlap: int
    vae_num_tiles: int
    vae_bytes: int
    memory_budget: int
    resident_bytes: int

    @property
    def predicted_peak_bytes(self) -> int:
        working = max([s.predicted_bytes for s in self.stages] + [self.vae_bytes])
        return self.resident_bytes + working

    def __str__(self) -> str:
        lines = [
            f"GSPN SDXL plan: {self.width}x{self.height}, {len(self.stages)} stage(s), batch {self.batch}, "
            f"CFG {'on' if self.cfg else 'off'}, budget {_gib(self.memory_budget)}",
            f"{'stage':>5}  {'size (WxH)':>11}  {'strength':>8}  {'steps':>9}  {'guide':>5}  "
            f"{'UNet layout':<50}  {'tiles':>5}  {'memory':>9}",
        ]
        for s in self.stages:
            if s.tile_size is None:
                layout = "whole latent"
            else:
                layout = f"tiles {s.tile_size[1]}x{s.tile_size[0]} px, overlap {s.tile_overlap}"
            layout += ", CFG " + ("sequential" if s.cfg_sequential else "batched") if self.cfg else ""
            lines.append(
                f"{s.index:>5}  {f'{s.width}x{s.height}':>11}  {s.strength:>8.2f}  "
                f"{f'{s.steps}/{s.schedule_steps}':>9}  {s.upsample_guidance:>5.2f}  {layout:<50}  "
                f"{s.num_tiles:>5}  {_gib(s.predicted_bytes):>9}"
            )
        vae = "whole image" if self.vae_tile_size is None else (
            f"tiles {self.vae_tile_size} px, overlap {self.vae_overlap}, {self.vae_num_tiles} tiles, "
            f"whole-image context at {self.vae_context_size} px")
        lines.append(f"VAE: {vae}, {_gib(self.vae_bytes)}")
        lines.append(
            f"predicted peak: {_gib(self.predicted_peak_bytes)} "
            f"(resident {_gib(self.resident_bytes)} + working {_gib(self.predicted_peak_bytes - self.resident_bytes)})"
        )
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 1024**2:.1f} MiB"


def stage_sizes(height: int, width: int, base: int, vae_factor: int) -> list[tuple[int, int]]:
    """(height, width) pixels of every stage; the last is (height, width).

    Direct when height * width <= base^2. Otherwise k = ceil(log2(r)) upscale stages, r the linear
    ratio sqrt(height * width) / base, each by the factor r^(1/k) <= 2; earlier stages are rounded to
    multiples of ``vae_factor * LATENT_ALIGN``.
    """
    if height * width <= base * base:
        return [(height, width)]
    ratio = math.sqrt(height * width) / base
    upscales = math.ceil(math.log2(ratio) - 1e-9)
    factor = ratio ** (1 / upscales)
    unit = vae_factor * LATENT_ALIGN
    sizes = []
    for j in range(upscales, 0, -1):
        size = tuple(max(unit, round(n / factor**j / unit) * unit) for n in (height, width))
        if not sizes or size != sizes[-1]:
            sizes.append(size)
    if sizes[-1] != (height, width):
        sizes.append((height, width))
    return sizes


def _per_upscale(value, count: int, name: str, default) -> list[float]:
    """One value per upscale stage from None (defaults), a number, or a list of ``count`` numbers."""
    if value is None:
        return [default(k + 1) for k in range(count)]
    if isinstance(value, (int, float)):
        return [float(value)] * count
    value = [float(v) for v in value]
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} values but this size has {count} upscale stage(s)")
    return value


def _schedule(num_inference_steps: int, stage_steps, strengths: list[float]) -> list[tuple[int, int]]:
    """(steps, schedule_steps) of each stage. Without ``stage_steps``, img2img's rule: a stage of
    strength s runs the last int(N * s) of N steps. With it, stage i runs stage_steps[i] steps, the tail
    of a schedule of ceil(steps / s)."""
    if stage_steps is None:
        return [(max(1, int(num_inference_steps * s)) if s < 1 else num_inference_steps, num_inference_steps)
                for s in strengths]
    if isinstance(stage_steps, int):
        stage_steps = [stage_steps] * len(strengths)
    stage_steps = list(stage_steps)
    if len(stage_steps) != len(strengths):
        raise ValueError(f"stage_steps has {len(stage_steps)} values but this size has {len(strengths)} stage(s)")
    if any(not isinstance(n, int) or n < 1 for n in stage_steps):
        raise ValueError(f"stage_steps must be positive integers; got {stage_steps}")
    return [(n, max(n, math.ceil(n / s - 1e-9))) for n, s in zip(stage_steps, strengths)]


def _unet_overlap(tile: tuple[int, int]) -> int:
    """Latent pixels neighbouring UNet tiles share: a quarter of the tile."""
    return max(2, min(tile) // 4)


def _vae_overlap(tile: int) -> int:
    return min(VAE_OVERLAP_LATENT, tile // 4)


def _unet_grid(latent_h: int, latent_w: int, tile: tuple[int, int]) -> TileGrid:
    overlap = _unet_overlap(tile)
    return TileGrid(latent_h, latent_w, tile, overlap=overlap, margin=overlap // 4, align=LATENT_ALIGN)


def _vae_grid(latent_h: int, latent_w: int, tile: int) -> TileGrid:
    overlap = _vae_overlap(tile)
    return TileGrid(latent_h, latent_w, tile, overlap=overlap, margin=overlap // 4)


def vae_tile_grid(latent_h: int, latent_w: int, vae_tile_size: int | None, vae_factor: int) -> TileGrid | None:
    """The VAE's tiles over a latent (latent pixels), or None to decode it whole."""
    if vae_tile_size is None:
        return None
    return _vae_grid(latent_h, latent_w, vae_tile_size // vae_factor)


def _stage_layout(latent_h, latent_w, batch, cfg, memory: MemoryModel, budget, tile_latent=None):
    """(tile (h, w) latent or None, cfg_sequential, predicted bytes) for one stage, or None if nothing fits."""
    pixels = latent_h * latent_w
    halves = 2 if cfg else 1

    def need(tile, unet_batch):
        tile_pixels = pixels if tile is None else tile[0] * tile[1]
        return memory.stage_bytes(pixels, tile_pixels, unet_batch, batch)

    if tile_latent is not None and tile_latent < max(latent_h, latent_w):
        tile = (min(tile_latent, latent_h), min(tile_latent, latent_w))
        for sequential in (False, True) if cfg else (False,):
            n = need(tile, batch if sequential else batch * halves)
            if n <= budget:
                return tile, sequential, n
        return None
    for sequential in (False, True) if cfg else (False,):
        n = need(None, batch if sequential else batch * halves)
        if n <= budget:
            return None, sequential, n
    if tile_latent is not None:
        return None
    # The largest tile whose UNet call fits next to the stage's latent buffers.
    buffers = need((0, 0), batch)
    tile_pixels = (budget - buffers) / (memory.unet_bytes(1024, batch) / 1024)
    if tile_pixels < MIN_TILE_LATENT**2:
        return None
    side = int(math.sqrt(tile_pixels)) // LATENT_ALIGN * LATENT_ALIGN
    if side >= latent_h:
        tile = (latent_h, min(latent_w, int(tile_pixels // latent_h) // LATENT_ALIGN * LATENT_ALIGN))
    elif side >= latent_w:
        tile = (min(latent_h, int(tile_pixels // latent_w) // LATENT_ALIGN * LATENT_ALIGN), latent_w)
    else:
        tile = (side, side)
    if min(tile) < MIN_TILE_LATENT:
        return None
    tile = (_balanced_tile(latent_h, tile[0]), _balanced_tile(latent_w, tile[1]))
    return tile, cfg, need(tile, batch)


def _balanced_tile(length: int, largest: int) -> int:
    """The smallest tile (<= largest) that covers ``length`` with as few tiles as ``largest`` needs,
    neighbours sharing a quarter tile: no tile bigger than the count of tiles requires."""
    if largest >= length:
        return length
    count = math.ceil((length - largest / 4) / (largest * 3 / 4))
    tile = math.ceil(length / (0.75 * count + 0.25) / LATENT_ALIGN) * LATENT_ALIGN
    return min(largest, max(tile, MIN_TILE_LATENT))


def _make_stage(index, size, strength, steps, guide, layout, vae_factor) -> StagePlan:
    tile, sequential, predicted = layout
    height, width = size
    if tile is None:
        tile_size, overlap, count = None, 0, 1
    else:
        grid = _unet_grid(height // vae_factor, width // vae_factor, tile)
        tile_size = (tile[0] * vae_factor, tile[1] * vae_factor)
        overlap, count = _unet_overlap(tile) * vae_factor, len(grid)
    return StagePlan(
        index=index, height=height, width=width, strength=strength, steps=steps[0], schedule_steps=steps[1],
        upsample_guidance=guide, tile_size=tile_size, tile_overlap=overlap, num_tiles=count,
        cfg_sequential=sequential, predicted_bytes=predicted,
    )


def make_plan(
    *,
    height: int,
    width: int,
    base_size: int,
    vae_factor: int,
    memory: MemoryModel,
    memory_budget: int,
    batch: int = 1,
    cfg: bool = True,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    strength=None,
    stage_steps=None,
    upsample_guidance=None,
    tile_size: int | None = None,
    vae_tile_size: int | None = None,
) -> Plan:
    """Plan a call; ValueError, before any work, for bad arguments or a size that cannot fit.

    ``strength`` and ``upsample_guidance``: None (defaults), a number for every upscale stage, or one
    value per upscale stage. ``stage_steps``: None, an int for every stage, or one per stage (base
    included). ``tile_size`` / ``vae_tile_size``: pixels, None to choose from the budget.
    ``memory_budget``: bytes of working memory beyond ``memory.resident_bytes``.
    """
    for name, n in (("height", height), ("width", width)):
        if not isinstance(n, int) or n <= 0 or n % vae_factor:
            raise ValueError(f"{name} must be a positive multiple of {vae_factor} (the VAE's factor); got {n}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps}")
    for name, n, least in (("tile_size", tile_size, MIN_TILE_LATENT), ("vae_tile_size", vae_tile_size,
                                                                         MIN_VAE_TILE_LATENT)):
        if n is not None and (n % vae_factor or n < least * vae_factor):
            raise ValueError(f"{name} must be a multiple of {vae_factor} and at least {least * vae_factor} "
                             f"pixels; got {n}")

    sizes = stage_sizes(height, width, base_size, vae_factor)
    upscales = len(sizes) - 1
    strengths = [1.0] + _per_upscale(strength, upscales, "strength", default_strength)
    guides = [0.0] + _per_upscale(upsample_guidance, upscales, "upsample_guidance",
                                  lambda _: DEFAULT_UPSAMPLE_GUIDANCE)
    if any(not 0 < s <= 1 for s in strengths):
        raise ValueError(f"strength must be in (0, 1]; got {strengths[1:]}")
    if any(not 0 <= g <= 1 for g in guides):
        raise ValueError(f"upsample_guidance must be in [0, 1]; got {guides[1:]}")
    schedules = _schedule(num_inference_steps, stage_steps, strengths)

    stages = []
    for index, (size, s, steps, guide) in enumerate(zip(sizes, strengths, schedules, guides)):
        latent_h, latent_w = size[0] // vae_factor, size[1] // vae_factor
        tile_latent = None if tile_size is None else tile_size // vae_factor
        layout = _stage_layout(latent_h, latent_w, batch, cfg, memory, memory_budget, tile_latent)
        if layout is None:
            raise ValueError(
                f"stage {index} ({size[1]}x{size[0]}) does not fit the memory budget of {_gib(memory_budget)}"
                + ("" if tile_size is None else f" with tile_size {tile_size}")
                + "; pass a smaller tile_size, a smaller size or free memory"
            )
        stages.append(_make_stage(index, size, s, steps, guide, layout, vae_factor))

    vae_tile, vae_context, vae_bytes = _vae_layout(height, width, batch, vae_factor, memory, memory_budget, vae_tile_size)
    grid = vae_tile_grid(height // vae_factor, width // vae_factor, vae_tile, vae_factor)
    return Plan(
        height=height, width=width, batch=batch, cfg=cfg, stages=tuple(stages),
        vae_tile_size=vae_tile, vae_context_size=vae_context, vae_overlap=0 if grid is None else _vae_overlap(vae_tile // vae_factor) * vae_factor,
        vae_num_tiles=1 if grid is None else len(grid), vae_bytes=vae_bytes,
        memory_budget=memory_budget, resident_bytes=memory.resident_bytes,
    )


def _vae_layout(height, width, batch, vae_factor, memory: MemoryModel, budget, vae_tile_size):
    """(tile edge or None for the whole image, context edge, predicted bytes) of the decode, in pixels.

    The context pass (vae_tiling) decodes the whole latent, downscaled to at most VAE_CONTEXT_PIXELS
    per side, so it must fit as well as one tile.
    """
    image_pixels = height * width

    def need(pixels):
        return memory.vae_bytes(pixels, image_pixels, batch)

    def context_pixels(edge):
        h, w = context_shape(height // vae_factor, width // vae_factor, edge // vae_factor)
        return h * w * vae_factor**2

    context = min(VAE_CONTEXT_PIXELS, max(height, width)) // vae_factor * vae_factor
    while need(context_pixels(context)) > budget:
        context = context * 3 // 4 // vae_factor * vae_factor
        if context < MIN_VAE_TILE_LATENT * vae_factor:
            raise ValueError(f"the VAE decode of {width}x{height} does not fit the memory budget of {_gib(budget)}")
    if vae_tile_size is None:
        if max(height, width) <= context:
            return None, context, need(image_pixels)
        tile = min(VAE_TILE_PIXELS, max(height, width)) // vae_factor * vae_factor
        while need(min(tile, height) * min(tile, width)) > budget:
            tile = tile * 3 // 4 // vae_factor * vae_factor
            if tile < MIN_VAE_TILE_LATENT * vae_factor:
                raise ValueError(f"the VAE decode of {width}x{height} does not fit the memory budget of {_gib(budget)}")
    elif vae_tile_size >= max(height, width):
        if need(image_pixels) > budget:
            raise ValueError(f"the VAE decode of {width}x{height} does not fit the memory budget of {_gib(budget)}")
        return None, context, need(image_pixels)
    else:
        tile = vae_tile_size
        if need(min(tile, height) * min(tile, width)) > budget:
            raise ValueError(f"the VAE decode of {width}x{height} in tiles of {tile} does not fit the memory "
                             f"budget of {_gib(budget)}")
    tile_bytes = need(min(tile, height) * min(tile, width))
    return tile, context, max(tile_bytes, need(context_pixels(context)))


def shrink_stage(stage: StagePlan, cfg: bool, batch: int, memory: MemoryModel, vae_factor: int) -> StagePlan:
    """The stage re-planned after running out of memory: tiles of about half the area, or, at the
    smallest tile, the CFG halves one after the other. RuntimeError when neither is possible."""
    latent_h, latent_w = stage.height // vae_factor, stage.width // vae_factor
    current = (latent_h, latent_w) if stage.tile_size is None else (
        stage.tile_size[0] // vae_factor, stage.tile_size[1] // vae_factor)
    side = int(max(current) / math.sqrt(2)) // LATENT_ALIGN * LATENT_ALIGN
    if side >= MIN_TILE_LATENT:
        tile, sequential = (min(side, latent_h), min(side, latent_w)), stage.cfg_sequential
    elif cfg and not stage.cfg_sequential:
        tile, sequential = current, True
    else:
        raise RuntimeError(f"stage {stage.index} ran out of memory even with the smallest tiles")
    unet_batch = batch if sequential or not cfg else 2 * batch
    predicted = memory.stage_bytes(latent_h * latent_w, tile[0] * tile[1], unet_batch, batch)
    return _make_stage(stage.index, (stage.height, stage.width), stage.strength,
                      (stage.steps, stage.schedule_steps), stage.upsample_guidance,
                      (tile, sequential, predicted), vae_factor)
