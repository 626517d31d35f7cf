"""How much memory the pipeline's UNet and VAE need, and how much there is.

The constants are measured on one H100 80GB (SDXL, float16), see docs/benchmarks.md ("Anchors"):

- UNet with attn1 removed, batch 1: 8K image (1024^2 latent pixels) 14.9 GiB, 16K (2048^2) 44.9 GiB.
  The difference, 30 GiB over 3 * 1024^2 latent pixels, is 10 KiB per latent pixel per batch element;
  the rest (4.9 GiB) is the weights. The softmax UNet at 8K, CFG batch 2, peaked at 24.9 GiB =
  4.9 + 2 x 10 GiB: the same slope, so memory is linear in pixels and batch.
- VAE decode of one 1024^2 / 2048^2 image: 2.6 / 9.7 GiB, i.e. 7.1 GiB over 3 * 1024^2 pixels,
  2.37 KiB per image pixel (float32 twice that: 19.4 GiB at 2048^2).

Other models (the tiny test SDXL) scale these by their channel widths: activation memory per
latent pixel is taken as proportional to sum_l width_l / 4^l over the resolution levels l.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GIB = 1024**3

SDXL_UNET_BYTES_PER_LATENT_PIXEL = 10 * 1024  # float16, per batch element
SDXL_UNET_WIDTHS = (320, 640, 1280)
SDXL_VAE_BYTES_PER_PIXEL = (9.7 - 2.6) * GIB / (3 * 1024**2)  # float16 decode, per image pixel
SDXL_VAE_WIDTHS = (128, 256, 512, 512)

# Not in the anchors: GSPN processors' temporaries (proxy, gates, four directions) and allocator
# fragmentation on top of the attention-free UNet; the VAE's tiled decode keeps one tile output and
# GroupNorm-statistics temporaries besides.
UNET_HEADROOM = 1.15
VAE_HEADROOM = 1.25
# Latent-sized float32 buffers alive during a stage: latents, start latent, noise, upsampled
# previous latent, guide, the two CFG halves of the blended noise prediction.
LATENT_BUFFERS = 7
# Fraction of the free memory the planner hands out when no explicit budget is given.
FREE_MEMORY_FRACTION = 0.9


def level_width_sum(widths) -> float:
    """sum_l widths[l] / 4^l: activation channels per pixel of the finest level."""
    return sum(w / 4**level for level, w in enumerate(widths))


@dataclass(frozen=True)
class MemoryModel:
    """Predicted working memory (bytes, beyond resident weights) of the UNet and the VAE.

    Attributes:
        unet_bytes_per_latent_pixel: per latent pixel and batch element, in the UNet's dtype.
        latent_channels: channels of a latent.
        vae_bytes_per_pixel: per image pixel and batch element, in the VAE's decode dtype.
        resident_bytes: bytes already held (weights) when planning.
    """

    unet_bytes_per_latent_pixel: float
    latent_channels: int
    vae_bytes_per_pixel: float
    resident_bytes: int = 0

    @classmethod
    def for_models(cls, unet, vae, unet_dtype: torch.dtype, vae_dtype: torch.dtype, resident_bytes: int = 0):
        """Scale the SDXL anchors to ``unet``'s / ``vae``'s widths and the dtypes they run in."""
        unet_scale = level_width_sum(unet.config.block_out_channels) / level_width_sum(SDXL_UNET_WIDTHS)
        vae_scale = level_width_sum(vae.config.block_out_channels) / level_width_sum(SDXL_VAE_WIDTHS)
        anchor_itemsize = 2  # the anchors are float16
        return cls(
            unet_bytes_per_latent_pixel=SDXL_UNET_BYTES_PER_LATENT_PIXEL * unet_scale * _itemsize(unet_dtype)
            / anchor_itemsize,
            latent_channels=unet.config.in_channels,
            vae_bytes_per_pixel=SDXL_VAE_BYTES_PER_PIXEL * vae_scale * _itemsize(vae_dtype) / anchor_itemsize,
            resident_bytes=resident_bytes,
        )

    def unet_bytes(self, latent_pixels: int, batch: int) -> int:
        """Working bytes of one UNet call on ``batch`` latents of ``latent_pixels`` each."""
        return int(self.unet_bytes_per_latent_pixel * UNET_HEADROOM * latent_pixels * batch)

    def stage_bytes(self, stage_latent_pixels: int, tile_latent_pixels: int, unet_batch: int, batch: int) -> int:
        """A stage: one UNet call on a tile (or the whole latent) plus the latent-sized buffers."""
        buffers = LATENT_BUFFERS * self.latent_channels * 4 * stage_latent_pixels * batch
        return self.unet_bytes(tile_latent_pixels, unet_batch) + buffers

    def vae_bytes(self, tile_pixels: int, image_pixels: int, batch: int) -> int:
        """Decoding ``batch`` images in tiles of ``tile_pixels``, into a float32 image of ``image_pixels``."""
        image = 3 * 4 * image_pixels * batch
        return int(self.vae_bytes_per_pixel * VAE_HEADROOM * tile_pixels * batch) + image


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def available_bytes(device: torch.device) -> int:
    """Memory the pipeline may use on ``device`` beyond what is allocated now.

    CUDA: free device memory plus what PyTorch's caching allocator holds unused. Elsewhere: the
    host's available RAM (os.sysconf). A fraction ``FREE_MEMORY_FRACTION`` of it, for safety.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int((free + cached) * FREE_MEMORY_FRACTION)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 8 * GIB
    return int(free * FREE_MEMORY_FRACTION)


def resident_bytes(modules, device: torch.device) -> int:
    """Bytes held on ``device`` now: allocated CUDA memory, or elsewhere the modules' parameters and buffers."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    seen = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
