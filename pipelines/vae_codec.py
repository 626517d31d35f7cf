"""Which way a VAE decodes and encodes here: the synchronised tiling of ``vae_tiling`` (AutoencoderKL), or
the VAE's own ``decode`` / ``encode`` (AutoencoderTiny, ConsistencyDecoderVAE, ...).

The synchronised tiling swaps GroupNorm statistics and attention tokens inside an AutoencoderKL's encoder
and decoder; other VAEs are built differently (AutoencoderTiny has no GroupNorm, ConsistencyDecoderVAE
decodes with a diffusion UNet), so they decode whole images, or tile with their own ``enable_tiling``
where they have one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from diffusers import AutoencoderKL
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents

from .tiling import TileGrid
from .vae_tiling import TileSpread, decode_tiled, encode_tiled


def has_synchronised_tiling(vae) -> bool:
    """Whether ``vae_tiling``'s decoder and encoder apply to ``vae``."""
    return isinstance(vae, AutoencoderKL)


def _tiles_itself(vae, direction: str) -> bool:
    """Whether ``vae`` has tiled ``direction`` ("decode" / "encode") of its own behind ``enable_tiling``."""
    return hasattr(vae, "enable_tiling") and any(
        hasattr(vae, name) for name in (f"tiled_{direction}", f"_tiled_{direction}"))


def check_vae(vae, needs_tiles: bool, directions: tuple[str, ...]) -> None:
    """ValueError, before any work, when the plan needs VAE tiles for a VAE that can tile neither the
    synchronised way nor its own way in each of ``directions``."""
    if not needs_tiles or has_synchronised_tiling(vae):
        return
    missing = [d for d in directions if not _tiles_itself(vae, d)]
    if missing:
        raise ValueError(
            f"the VAE ({type(vae).__name__}) cannot {' or '.join(missing)} in tiles: the synchronised tiling "
            "works on AutoencoderKL only and this VAE has no tiling of its own for it, but the plan needs VAE "
            "tiles to fit the memory budget; use an AutoencoderKL, a smaller size or a larger memory_budget"
        )


def decode(vae, latents: torch.Tensor, grid: TileGrid | None, context_size: int,
           on_tile: Callable | None = None, tiles: list[int] | None = None,
           spread: TileSpread | None = None) -> torch.Tensor:
    """``decode_tiled``'s contract for any VAE: (B, c, h, w) latents (divided by the scaling factor, in
    the VAE's dtype) -> float32 (B, 3, h * f, w * f) image in [-1, 1]. A VAE without synchronised tiling
    runs its own ``decode`` (in every process: ``tiles`` and ``spread`` apply to the synchronised
    tiling only), tiled its own way (``enable_tiling``) when ``grid`` has several tiles."""
    if has_synchronised_tiling(vae):
        return decode_tiled(vae, latents, grid, context_size, on_tile, tiles, spread)
    with _own_tiling(vae, grid is not None and len(grid) > 1):
        image = vae.decode(latents, return_dict=False)[0].float()
    if on_tile is not None:
        on_tile()
    return image


def encode(vae, image: torch.Tensor, grid: TileGrid | None, context_size: int,
           on_tile: Callable | None = None, tiles: list[int] | None = None,
           spread: TileSpread | None = None) -> torch.Tensor:
    """``encode_tiled``'s contract for any VAE: (B, 3, H, W) image -> float32 latents (the distribution's
    mode where the VAE gives a distribution), not yet times the scaling factor; ``tiles`` and ``spread``
    as for ``decode``."""
    if has_synchronised_tiling(vae):
        return encode_tiled(vae, image, grid, context_size, on_tile, tiles, spread)
    with _own_tiling(vae, grid is not None and len(grid) > 1):
        latents = retrieve_latents(vae.encode(image), sample_mode="argmax").float()
    if on_tile is not None:
        on_tile()
    return latents


@contextmanager
def _own_tiling(vae, wanted: bool):
    """Turns the VAE's own tiling on for the block when ``wanted`` (and back off after, if it was off)."""
    switch = wanted and hasattr(vae, "use_tiling") and not vae.use_tiling
    if switch:
        vae.use_tiling = True
    try:
        yield
    finally:
        if switch:
            vae.use_tiling = False
