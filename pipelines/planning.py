"""The plan of one generation: its stages, how each runs the UNet, how the VAE decodes, the memory.

Decided before any work from the requested size, the batch and a memory budget, so that bad input
and sizes that cannot fit are refused at once, and so that a user can print the plan first.

Stages. Up to the base resolution (UNet sample size x VAE factor; 1024 for SDXL) in area, one stage
makes the image directly. Above it, a base stage at about the base area with the requested aspect
ratio, then upscale stages, each at most x2 per side (equal factors; exactly x2 for power-of-two
multiples of the base), the last at exactly the requested size. Every upscale stage re-noises the
upsampled latent of the stage before to its ``strength`` and denoises it.

Attention of a stage: the teacher's softmax self-attention ("softmax") in the base stage, inside the
resolution the UNet was trained at, where it is also the cheaper one; the mounted GSPN adapter
("gspn") in the upscale stages, where softmax's cost grows with the square of the tokens. Without an
adapter every stage is softmax.

UNet layout of a stage, by preference: the whole latent with both CFG halves in one batch; the whole
latent with the halves one after the other (``cfg_sequential``); overlapping tiles as large as the
budget allows, halves one after the other. A forced ``tile_size`` keeps the halves batched when they fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .memory import GIB, MemoryModel
from .tiling import TileGrid, context_shape

DEFAULT_NUM_INFERENCE_STEPS = 30
DEFAULT_UPSAMPLE_GUIDANCE = 0.5
# Intermediate sizes and tile starts are multiples of 4 latent pixels: SDXL's UNet halves the
# latent twice, so tiles then share the down-sampling phase of the whole latent.
LATENT_ALIGN = 4
MIN_TILE_LATENT = 16
# VAE tiles of at most 2048 pixels: the decode costs the same per pixel in 1536 and 2048 px tiles (H200,
# benchmarks/bench_vae.py: 38 ns a pixel), and larger tiles decode less overlap. Tiles overlap by 16 latent
# pixels, 4 of them weightless margin. The context pass decodes the whole latent downscaled to at most
# 2048 pixels a side.
VAE_TILE_PIXELS = 2048
VAE_CONTEXT_PIXELS = 2048
VAE_OVERLAP_LATENT = 16
MIN_VAE_TILE_LATENT = 16
ATTENTIONS = ("softmax", "gspn")


def default_strength(stage_index: int) -> float:
    """Re-noising strength of upscale stage ``stage_index`` (1, 2, ...): 0.5, 0.45, 0.4, 0.35, then 0.3.

    Each x2 stage only has to add the detail of one octave, so later (larger) stages keep more of
    what they are given, which also keeps the UNet from inventing new objects inside big images.
    """
    return max(0.3, 0.55 - 0.05 * stage_index)


@dataclass(frozen=True)
class Unit:
    """One UNet call of a denoising step: images ``images[0]:images[1]`` of the batch, the CFG halves
    ``halves`` (0 unconditional, 1 conditional; (0,) without CFG) batched together, on tile ``tile``
    of the stage's grid (None: the whole latent)."""

    images: tuple[int, int]
    halves: tuple[int, ...]
    tile: int | None

    def describe(self, batch: int, cfg: bool) -> str:
        parts = []
        if self.images != (0, batch):
            parts.append(f"image {self.images[0]}" if self.images[1] - self.images[0] == 1
                         else f"images {self.images[0]}-{self.images[1] - 1}")
        if cfg and len(self.halves) == 1:
            parts.append(("uncond", "cond")[self.halves[0]])
        if self.tile is not None:
            parts.append(f"tile {self.tile}")
        return " ".join(parts) or "all"


@dataclass(frozen=True)
class StagePlan:
    """One denoising stage.

    Attributes:
        index: 0 for the base stage.
        height, width: image pixels of this stage; ``latent_height``, ``latent_width`` its latent.
        strength: 1.0 for the base stage (from pure noise); the re-noising strength otherwise.
        steps: denoising steps this stage runs.
        schedule_steps: steps of the full schedule the stage's steps are the tail of.
        upsample_guidance: weight at the stage's first step of the pull towards the upsampled previous
            latent (0 in the base stage).
        grid: the UNet tiles over the latent (latent pixels), or None for the whole latent.
        cfg_sequential: the CFG halves run one after the other instead of as one batch of 2.
        attention: the UNet's self-attention in this stage, "softmax" (the UNet's own processors) or
            "gspn" (the mounted adapter's).
        units: the UNet calls of one step; ``owners[k]`` is the process that runs ``units[k]``.
        predicted_bytes: predicted working memory of the stage (per process).
        upsample: for pixel upsampling, the VAE layouts (decode of the previous stage's latent, encode
            at this stage's size); None otherwise.
    """

    index: int
    height: int
    width: int
    latent_height: int
    latent_width: int
    strength: float
    steps: int
    schedule_steps: int
    upsample_guidance: float
    grid: TileGrid | None
    cfg_sequential: bool
    attention: str
    units: tuple[Unit, ...]
    owners: tuple[int, ...]
    predicted_bytes: int
    upsample: tuple["VaePlan", "VaePlan"] | None = None

    @property
    def tile(self) -> tuple[int, int] | None:
        """(height, width) latent pixels of a UNet tile, or None for the whole latent."""
        return None if self.grid is None else (self.grid.tile_height, self.grid.tile_width)

    @property
    def num_tiles(self) -> int:
        return 1 if self.grid is None else len(self.grid)

    def units_of(self, process: int, num_processes: int) -> list[Unit]:
        """The units process ``process`` of ``num_processes`` runs; all of them in a single process."""
        if num_processes == 1:
            return list(self.units)
        return [u for u, owner in zip(self.units, self.owners) if owner == process]


@dataclass(frozen=True)
class VaePlan:
    """How the VAE decodes (or encodes) one latent of ``latent_height x latent_width``.

    Attributes:
        grid: tiles over the latent (latent pixels), or None to run on it whole.
        context: longest side (latent pixels) of the whole-image context pass of a tiled run.
        owners: the process of each tile (empty when not tiled: every process runs it whole).
        predicted_bytes: predicted working memory (per process).
    """

    latent_height: int
    latent_width: int
    grid: TileGrid | None
    context: int
    owners: tuple[int, ...]
    predicted_bytes: int

    @property
    def num_tiles(self) -> int:
        return 1 if self.grid is None else len(self.grid)

    def tiles_of(self, process: int, num_processes: int) -> list[int] | None:
        """Indices of the tiles ``process`` runs (all in a single process); None when not tiled."""
        if self.grid is None:
            return None
        if num_processes == 1:
            return list(range(len(self.grid)))
        return [k for k, owner in enumerate(self.owners) if owner == process]


@dataclass(frozen=True)
class Plan:
    """Stages, VAE tiling, processes and predicted memory of one call; ``str(plan)`` is a readable table.

    ``num_processes``: the processes the plan is for; a single process runs any plan (all of its
    units), which gives the same result up to float rounding.
    """

    height: int
    width: int
    batch: int
    cfg: bool
    vae_scale_factor: int
    num_processes: int
    stages: tuple[StagePlan, ...]
    decode: VaePlan
    memory: MemoryModel
    memory_budget: int

    @property
    def resident_bytes(self) -> int:
        return self.memory.resident_bytes

    @property
    def predicted_peak_bytes(self) -> int:
        working = max([s.predicted_bytes for s in self.stages] + [self.decode.predicted_bytes])
        return self.resident_bytes + working

    def __str__(self) -> str:
        f = self.vae_scale_factor
        lines = [
            f"GSPN SDXL plan: {self.width}x{self.height}, {len(self.stages)} stage(s), batch {self.batch}, "
            f"CFG {'on' if self.cfg else 'off'}, budget {_gib(self.memory_budget)} per process, "
            f"{self.num_processes} process(es)",
            f"{'stage':>5}  {'size (WxH)':>11}  {'strength':>8}  {'steps':>9}  {'guide':>5}  {'attention':<9}  "
            f"{'UNet layout':<50}  {'tiles':>5}  {'memory':>9}",
        ]
        for s in self.stages:
            if s.grid is None:
                layout = "whole latent"
            else:
                layout = f"tiles {s.tile[1] * f}x{s.tile[0] * f} px, overlap {_unet_overlap(s.tile) * f}"
            layout += ", CFG " + ("sequential" if s.cfg_sequential else "batched") if self.cfg else ""
            lines.append(
                f"{s.index:>5}  {f'{s.width}x{s.height}':>11}  {s.strength:>8.2f}  "
                f"{f'{s.steps}/{s.schedule_steps}':>9}  {s.upsample_guidance:>5.2f}  {s.attention:<9}  {layout:<50}  "
                f"{s.num_tiles:>5}  {_gib(s.predicted_bytes):>9}"
            )
        d = self.decode
        vae = "whole image" if d.grid is None else (
            f"tiles {d.grid.tile_width * f}x{d.grid.tile_height * f} px, overlap {_vae_overlap(d.grid.tile_height) * f}, "
            f"{d.num_tiles} tiles, whole-image context at {d.context * f} px")
        lines.append(f"VAE: {vae}, {_gib(d.predicted_bytes)}")
        lines.append(
            f"predicted peak: {_gib(self.predicted_peak_bytes)} "
            f"(resident {_gib(self.resident_bytes)} + working {_gib(self.predicted_peak_bytes - self.resident_bytes)})"
        )
        if self.num_processes > 1:
            lines.append("processes (units of one step; VAE tiles):")
            for rank in range(self.num_processes):
                work = []
                for s in self.stages:
                    mine = [u.describe(self.batch, self.cfg) for u in s.units_of(rank, self.num_processes)]
                    work.append(f"stage {s.index}: {_ranges(mine)}")
                tiles = d.tiles_of(rank, self.num_processes)
                work.append("decode: " + ("whole" if tiles is None else f"{len(tiles)} tiles"))
                lines.append(f"  process {rank}: " + "; ".join(work))
        return "\n".join(lines)


def _ranges(names: list[str]) -> str:
    """'tile 0, tile 1, tile 2' -> 'tile 0-2'; other lists joined by commas."""
    if not names:
        return "idle"
    prefixes = {n.rpartition(" ")[0] for n in names}
    if len(names) > 2 and len(prefixes) == 1 and all(n.rpartition(" ")[2].isdigit() for n in names):
        numbers = [int(n.rpartition(" ")[2]) for n in names]
        if numbers == list(range(numbers[0], numbers[-1] + 1)):
            return f"{prefixes.pop()} {numbers[0]}-{numbers[-1]}"
    return ", ".join(names)


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


def stage_attentions(stage_attention, num_stages: int, gspn_available: bool) -> list[str]:
    """The attention ("softmax" or "gspn") of each of ``num_stages`` stages.

    ``stage_attention``: None (softmax in the base stage, gspn above; softmax everywhere when
    ``gspn_available`` is False), one of ``ATTENTIONS`` for every stage, or a list of one per stage.
    The base stage is softmax even where rounding to the latent alignment puts it a few percent above
    the base area: it is the stage at the resolution the UNet was trained at. ValueError naming
    ``stage_attention`` for anything else, and for "gspn" without an adapter.
    """
    if stage_attention is None:
        return ["softmax"] + ["gspn" if gspn_available else "softmax"] * (num_stages - 1)
    if isinstance(stage_attention, str):
        values = [stage_attention] * num_stages
    elif isinstance(stage_attention, (list, tuple)):
        values = list(stage_attention)
        if len(values) != num_stages:
            raise ValueError(f"stage_attention has {len(values)} values but this size has {num_stages} stage(s)")
    else:
        values = [stage_attention]
    if any(not isinstance(v, str) or v not in ATTENTIONS for v in values):
        raise ValueError(f"stage_attention must be None, one of {ATTENTIONS} or a list of them, one per stage; "
                         f"got {stage_attention!r}")
    if "gspn" in values and not gspn_available:
        raise ValueError("stage_attention asks for 'gspn' but the pipeline has no GSPN adapter mounted")
    return values


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


def vae_grid(latent_h: int, latent_w: int, tile: int | None) -> TileGrid | None:
    """The VAE's tiles of at most ``tile`` latent pixels a side over a latent, or None to run on it whole."""
    if tile is None or tile >= max(latent_h, latent_w):
        return None
    overlap = _vae_overlap(tile)
    tiles = (_fewest_tiles(latent_h, tile, overlap), _fewest_tiles(latent_w, tile, overlap))
    return TileGrid(latent_h, latent_w, tiles, overlap=overlap, margin=overlap // 4)


def _fewest_tiles(length: int, largest: int, overlap: int) -> int:
    """The smallest tile covering ``length`` in as few tiles of at most ``largest`` as possible, neighbours
    sharing ``overlap``: the tiles decode as few pixels twice as the count allows."""
    if largest >= length:
        return length
    count = math.ceil((length - overlap) / (largest - overlap))
    return math.ceil((length + (count - 1) * overlap) / count)


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


def _units(batch: int, cfg: bool, sequential: bool, image_split: bool, num_tiles: int | None) -> tuple[Unit, ...]:
    images = [(b, b + 1) for b in range(batch)] if image_split else [(0, batch)]
    halves = [(0,), (1,)] if cfg and sequential else [(0, 1) if cfg else (0,)]
    tiles = [None] if num_tiles is None else range(num_tiles)
    return tuple(Unit(i, h, t) for i in images for t in tiles for h in halves)


def _owners(count: int, num_processes: int) -> tuple[int, ...]:
    """Contiguous, balanced blocks of ``count`` items for ``num_processes`` processes."""
    return tuple(k * num_processes // count for k in range(count)) if count else ()


def _make_stage(index, size, latent, strength, steps, guide, layout, batch, cfg, num_processes=1,
                image_split=False, *, attention: str) -> StagePlan:
    tile, sequential, predicted = layout
    grid = None if tile is None else _unet_grid(*latent, tile)
    units = _units(batch, cfg, sequential, image_split, None if grid is None else len(grid))
    return StagePlan(
        index=index, height=size[0], width=size[1], latent_height=latent[0], latent_width=latent[1],
        strength=strength, steps=steps[0], schedule_steps=steps[1], upsample_guidance=guide, grid=grid,
        cfg_sequential=sequential, attention=attention, units=units, owners=_owners(len(units), num_processes),
        predicted_bytes=predicted,
    )


def make_plan(
    *,
    height: int,
    width: int,
    base_size: int,
    vae_scale_factor: int,
    memory: MemoryModel,
    memory_budget: int,
    batch: int = 1,
    cfg: bool = True,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    strength=None,
    stage_steps=None,
    upsample_guidance=None,
    upsample_mode: str = "latent",
    tile_size: int | None = None,
    vae_tile_size: int | None = None,
    num_processes: int = 1,
    stage_attention=None,
    gspn_available: bool = True,
) -> Plan:
    """Plan a call; ValueError, before any work, for bad arguments or a size that cannot fit.

    ``strength`` and ``upsample_guidance``: None (defaults), a number for every upscale stage, or one
    value per upscale stage. ``stage_steps``: None, an int for every stage, or one per stage (base
    included). ``tile_size`` / ``vae_tile_size``: pixels, None to choose from the budget.
    ``memory_budget``: bytes of working memory beyond ``memory.resident_bytes``, per process.
    ``num_processes``: processes to spread the work over (see ``_split_stage``).
    ``stage_attention``: None, "softmax", "gspn" or one per stage (``stage_attentions``);
    ``gspn_available``: whether a GSPN adapter is mounted. The memory model is the same for both
    attentions: SDPA's flash and memory-efficient kernels hold no tokens x tokens matrix, and the
    softmax UNet's peak lies on the attention-free anchors' slope (memory.py). Only SDPA's math
    fallback (CPU, some dtypes) is quadratic, which a softmax stage far above the base size would feel.
    """
    f = vae_scale_factor
    for name, n in (("height", height), ("width", width)):
        if not isinstance(n, int) or n <= 0 or n % f:
            raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's factor); got {n}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer; got {num_processes}")
    for name, n, least in (("tile_size", tile_size, MIN_TILE_LATENT), ("vae_tile_size", vae_tile_size,
                                                                         MIN_VAE_TILE_LATENT)):
        if n is not None and (n % f or n < least * f):
            raise ValueError(f"{name} must be a multiple of {f} and at least {least * f} pixels; got {n}")

    sizes = stage_sizes(height, width, base_size, f)
    attentions = stage_attentions(stage_attention, len(sizes), gspn_available)
    upscales = len(sizes) - 1
    strengths = [1.0] + _per_upscale(strength, upscales, "strength", default_strength)
    guides = [0.0] + _per_upscale(upsample_guidance, upscales, "upsample_guidance",
                                  lambda _: DEFAULT_UPSAMPLE_GUIDANCE)
    if any(not 0 < s <= 1 for s in strengths):
        raise ValueError(f"strength must be in (0, 1]; got {strengths[1:]}")
    if any(not 0 <= g <= 1 for g in guides):
        raise ValueError(f"upsample_guidance must be in [0, 1]; got {guides[1:]}")
    schedules = _schedule(num_inference_steps, stage_steps, strengths)

    decode = _vae_plan(height, width, batch, f, memory, memory_budget, vae_tile_size, num_processes)
    vae_tile = None if decode.grid is None else decode.grid.tile_height

    stages = []
    for index, (size, s, steps, guide, attention) in enumerate(zip(sizes, strengths, schedules, guides, attentions)):
        latent = (size[0] // f, size[1] // f)
        tile_latent = None if tile_size is None else tile_size // f
        layout = _stage_layout(*latent, batch, cfg, memory, memory_budget, tile_latent)
        if layout is None:
            raise ValueError(
                f"stage {index} ({size[1]}x{size[0]}) does not fit the memory budget of {_gib(memory_budget)}"
                + ("" if tile_size is None else f" with tile_size {tile_size}")
                + "; pass a smaller tile_size, a smaller size or free memory"
            )
        stage = _split_stage(index, size, latent, s, steps, guide, layout, batch, cfg, memory, memory_budget,
                             num_processes, forced_tile=tile_size is not None, attention=attention)
        if upsample_mode == "pixel" and index > 0:
            previous = stages[-1]
            stage = replace(stage, upsample=(
                _vae_layout_at(previous.latent_height, previous.latent_width, batch, vae_tile, decode, num_processes),
                _vae_layout_at(*latent, batch, vae_tile, decode, num_processes)))
        stages.append(stage)

    return Plan(height=height, width=width, batch=batch, cfg=cfg, vae_scale_factor=f,
                num_processes=num_processes, stages=tuple(stages), decode=decode, memory=memory,
                memory_budget=memory_budget)


def _split_stage(index, size, latent, strength, steps, guide, layout, batch, cfg, memory, budget, num_processes,
                 forced_tile=False, *, attention: str) -> StagePlan:
    """The stage with its units spread over ``num_processes``; one process: the layout as it is.

    Several processes: of the layouts that need no more memory than the one-process layout (tiles no
    larger, a UNet batch no larger), the one whose busiest process computes the fewest latent pixels
    per step; ties go to fewer tiles (fewer seams), then fewer units. A unit costs its tile's pixels
    times its UNet batch. Splitting the CFG halves or the images costs nothing extra and changes
    nothing, while every tile boundary adds the overlap (two tiles along an axis compute 8/7 of it)
    and limits what the UNet sees; so with CFG on two processes the halves are split, and tiles come
    in only when halves and images run out. The base stage is never split into tiles: it makes the
    composition, which needs the whole image.
    """
    chosen = _make_stage(index, size, latent, strength, steps, guide, layout, batch, cfg, attention=attention)
    if num_processes == 1:
        return chosen
    tile0, _, limit = layout
    pixels = latent[0] * latent[1]
    tiles = [tile0] if forced_tile or index == 0 else _tile_options(latent, tile0)
    best = None
    for tile in tiles:
        count = 1 if tile is None else len(_unet_grid(*latent, tile))
        tile_pixels = pixels if tile is None else tile[0] * tile[1]
        for image_split in (False, True) if batch > 1 else (False,):
            for sequential in (False, True) if cfg else (False,):
                unit_batch = (1 if image_split else batch) * (2 if cfg and not sequential else 1)
                need = memory.stage_bytes(pixels, tile_pixels, unit_batch, batch)
                if need > limit:
                    continue
                units = count * (batch if image_split else 1) * (2 if cfg and sequential else 1)
                key = (math.ceil(units / num_processes) * unit_batch * tile_pixels, count, units)
                if best is None or key < best[0]:
                    best = (key, (tile, sequential, need), image_split)
    return _make_stage(index, size, latent, strength, steps, guide, best[1], batch, cfg, num_processes, best[2],
                       attention=attention)


def _tile_options(latent: tuple[int, int], largest: tuple[int, int] | None) -> list:
    """Tiles that cover the latent in 1..8 x 1..8 tiles, none larger than ``largest`` (None: any)."""
    options = set() if largest is not None else {None}
    for rows in range(1, 9):
        for cols in range(1, 9):
            tile = (_tile_for_count(latent[0], rows), _tile_for_count(latent[1], cols))
            if min(tile) < MIN_TILE_LATENT or tile == latent:
                continue
            if largest is None or (tile[0] <= largest[0] and tile[1] <= largest[1]):
                options.add(tile)
    if largest is not None:
        options.add(largest)
    return sorted(options, key=lambda t: (0, 0) if t is None else t, reverse=True)


def _tile_for_count(length: int, count: int) -> int:
    """The tile that covers ``length`` in ``count`` tiles sharing a quarter tile with each neighbour."""
    if count == 1:
        return length
    return min(length, math.ceil(length / (0.75 * count + 0.25) / LATENT_ALIGN) * LATENT_ALIGN)


def _vae_layout_at(latent_h, latent_w, batch, tile, decode: VaePlan, num_processes) -> VaePlan:
    """The decode's tiling applied to another latent size (pixel upsampling's intermediate sizes)."""
    grid = vae_grid(latent_h, latent_w, tile)
    return VaePlan(latent_h, latent_w, grid, decode.context,
                   () if grid is None else _owners(len(grid), num_processes), decode.predicted_bytes)


def _vae_plan(height, width, batch, f, memory: MemoryModel, budget, vae_tile_size, num_processes) -> VaePlan:
    """The decode of the final latent: whole when it fits with the context, else tiles as large as
    the budget allows (at most VAE_TILE_PIXELS), each process decoding a contiguous block of tiles.

    The context pass decodes the whole latent, downscaled to at most VAE_CONTEXT_PIXELS per side, so
    it must fit as well as one tile. With several processes an image larger than one VAE tile is
    tiled so that its decode can be spread.
    """
    image_pixels = height * width
    latent_h, latent_w = height // f, width // f
    too_big = f"the VAE decode of {width}x{height} does not fit the memory budget of {_gib(budget)}"

    def need(pixels):
        return memory.vae_bytes(pixels, image_pixels, batch)

    def context_pixels(edge):
        h, w = context_shape(latent_h, latent_w, edge)
        return h * w * f**2

    context = min(VAE_CONTEXT_PIXELS, max(height, width)) // f
    while need(context_pixels(context)) > budget:
        context = context * 3 // 4
        if context < MIN_VAE_TILE_LATENT:
            raise ValueError(too_big)
    if vae_tile_size is None:
        whole = max(height, width) <= context * f and not (num_processes > 1 and max(height, width) > VAE_TILE_PIXELS)
        if whole:
            return VaePlan(latent_h, latent_w, None, context, (), need(image_pixels))
        tile = min(VAE_TILE_PIXELS, max(height, width)) // f
        while need(min(tile * f, height) * min(tile * f, width)) > budget:
            tile = tile * 3 // 4
            if tile < MIN_VAE_TILE_LATENT:
                raise ValueError(too_big)
    elif vae_tile_size >= max(height, width):
        if need(image_pixels) > budget:
            raise ValueError(too_big)
        return VaePlan(latent_h, latent_w, None, context, (), need(image_pixels))
    else:
        tile = vae_tile_size // f
        if need(min(tile * f, height) * min(tile * f, width)) > budget:
            raise ValueError(f"the VAE decode of {width}x{height} in tiles of {vae_tile_size} does not fit the "
                             f"memory budget of {_gib(budget)}")
    grid = vae_grid(latent_h, latent_w, tile)
    predicted = max(need(min(tile * f, height) * min(tile * f, width)), need(context_pixels(context)))
    owners = () if grid is None else _owners(len(grid), num_processes)
    return VaePlan(latent_h, latent_w, grid, context, owners, predicted)


def shrink_stage(plan: Plan, stage: StagePlan) -> StagePlan:
    """The stage re-planned after running out of memory: tiles of about half the area, or, at the
    smallest tile, the CFG halves one after the other. RuntimeError when neither is possible."""
    latent = (stage.latent_height, stage.latent_width)
    current = latent if stage.tile is None else stage.tile
    side = int(max(current) / math.sqrt(2)) // LATENT_ALIGN * LATENT_ALIGN
    if side >= MIN_TILE_LATENT:
        tile, sequential = (min(side, latent[0]), min(side, latent[1])), stage.cfg_sequential
    elif plan.cfg and not stage.cfg_sequential:
        tile, sequential = current, True
    else:
        raise RuntimeError(f"stage {stage.index} ran out of memory even with the smallest tiles")
    unet_batch = plan.batch if sequential or not plan.cfg else 2 * plan.batch
    predicted = plan.memory.stage_bytes(latent[0] * latent[1], tile[0] * tile[1], unet_batch, plan.batch)
    return _make_stage(stage.index, (stage.height, stage.width), latent, stage.strength,
                       (stage.steps, stage.schedule_steps), stage.upsample_guidance, (tile, sequential, predicted),
                       plan.batch, plan.cfg, attention=stage.attention)
