"""Tiled VAE decoding and encoding that see the whole image: shared GroupNorm statistics and global
mid-block attention.

Decoding in tiles the plain way (diffusers' ``enable_tiling``) normalises every tile by its own
GroupNorm statistics, so tiles with different content come out in different tone and contrast, and
the mid-block self-attention of each tile sees only that tile. Here decoding takes two passes:

1. context: one forward of the whole latent, area-downscaled to at most ``context_size`` per side
   when it is larger. Every GroupNorm keeps its per-image, per-group mean and variance; every
   attention layer keeps its normalised input tokens.
2. tiles: each tile runs with every GroupNorm normalising by the context's statistics and every
   attention taking its keys and values from the context's tokens; outputs are blended with the
   tiles' weights (``tiling.TileGrid``).

When the context is the whole latent at full size, the statistics and the attention are exactly
those of an untiled decode, and what is left of tiling is the convolutions' view of a tile. For
larger images the context is a downscaled image: all tiles still share one set of statistics (no
tone shifts between tiles) and attend to the whole picture.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .tiling import TileGrid, context_shape


class _SharedGroupNorm(nn.Module):
    """Stands in for one ``nn.GroupNorm`` while a ``WholeImageContext`` is installed."""

    def __init__(self, norm: nn.GroupNorm, owner: "WholeImageContext", key: int):
        super().__init__()
        self.norm = norm
        self.key = key
        self._owner = [owner]  # in a list, so that nn.Module does not register the owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        if owner.mode == "apply":
            return owner.normalise(self.key, self.norm, x)
        if owner.mode == "record":
            owner.record_statistics(self.key, self.norm, x)
        return self.norm(x)


class _ContextAttention:
    """Wraps an attention layer's processor: records the context's normalised tokens, then gives
    them to every tile as ``encoder_hidden_states`` (keys and values of the whole image)."""

    def __init__(self, processor, owner: "WholeImageContext", key: int):
        self.processor, self.owner, self.key = processor, owner, key

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs):
        if self.owner.mode == "record":
            tokens = hidden_states.flatten(2) if hidden_states.ndim == 4 else hidden_states.transpose(1, 2)
            if attn.group_norm is not None:
                tokens = attn.group_norm(tokens)
            self.owner.context_tokens[self.key] = tokens.transpose(1, 2)
        elif self.owner.mode == "apply":
            encoder_hidden_states = self.owner.context_tokens[self.key]
        return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, temb=temb, **kwargs)


class WholeImageContext:
    """Per-image statistics of every GroupNorm and the tokens of every self-attention in ``module``.

    ``mode``: "record" (one forward of the context: normal computation, statistics and tokens
    kept), "apply" (forwards of tiles with the kept statistics and tokens) or None (normal).
    Statistics: mean and variance (B, G), float32, per GroupNorm.
    """

    def __init__(self, module: nn.Module):
        self.mode: str | None = None
        self.statistics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.context_tokens: dict[int, torch.Tensor] = {}
        self._norms, self._attentions = [], []
        for name, child in module.named_modules():
            if isinstance(child, nn.GroupNorm):
                parent_name, _, attr = name.rpartition(".")
                self._norms.append((module.get_submodule(parent_name) if parent_name else module, attr, child))
            elif isinstance(child, Attention) and not child.is_cross_attention:
                self._attentions.append(child)

    @contextmanager
    def installed(self):
        """Swap in the stand-ins for the duration of the block; restore the module after."""
        processors = [attn.processor for attn in self._attentions]
        for key, (parent, attr, norm) in enumerate(self._norms):
            setattr(parent, attr, _SharedGroupNorm(norm, self, key))
        for key, attn in enumerate(self._attentions):
            attn.set_processor(_ContextAttention(attn.processor, self, key))
        try:
            yield self
        finally:
            for parent, attr, norm in self._norms:
                setattr(parent, attr, norm)
            for attn, processor in zip(self._attentions, processors):
                attn.set_processor(processor)
            self.mode = None

    def record_statistics(self, key: int, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        var, mean = torch.var_mean(x.detach().reshape(x.shape[0], norm.num_groups, -1).float(), dim=2,
                                   correction=0)
        self.statistics[key] = (mean, var)

    def normalise(self, key: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm of x (B, C, ...) with the recorded mean and variance, then its affine map."""
        mean, var = self.statistics[key]
        rstd = (var + norm.eps).rsqrt()
        y = x.reshape(x.shape[0], norm.num_groups, -1) - mean[..., None].to(x.dtype)
        y = y.mul_(rstd[..., None].to(x.dtype)).reshape(x.shape)
        if norm.affine:
            view = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            y = y.mul_(norm.weight.view(view).to(x.dtype)).add_(norm.bias.view(view).to(x.dtype))
        return y


def _downscaled(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


def _tiled_with_context(fn, module, x, context, grid: TileGrid, in_scale, out_scale, out_channels, on_tile,
                        tiles=None, spread: "TileSpread | None" = None):
    """Run ``fn`` once on ``context`` (recording), then on every tile of x (applying); blend the tile
    outputs. ``grid`` is on the coarse (latent) grid; x is ``in_scale`` and the output ``out_scale``
    times finer. ``tiles``: the indices to run here (None: all); ``spread``: how the context is shared
    and the blended output summed when the tiles are spread over processes."""
    shape = (x.shape[0], out_channels, grid.height * out_scale, grid.width * out_scale)
    out = torch.zeros(shape, dtype=torch.float32, device=x.device)
    whole = WholeImageContext(module)
    with whole.installed():
        whole.mode = "record"
        if spread is None:
            fn(context)
        else:
            spread.share_context(whole, lambda: fn(context))
        whole.mode = "apply"
        for index in range(len(grid)) if tiles is None else tiles:
            tile = grid.tiles[index]
            y = fn(x[(..., *tile.slices(in_scale))])
            out[(..., *tile.slices(out_scale))] += y.float() * grid.weight(index, x.device, out_scale)
            if on_tile is not None:
                on_tile()
    if spread is not None:
        spread.sum(out)
    return out


class TileSpread:
    """Tiles spread over processes: ``share_context(whole, record)`` runs ``record`` (the context
    pass) once and gives every process its statistics and tokens; ``sum(out)`` adds the processes'
    partial outputs in place. ``pipelines.distributed`` provides them for torch.distributed."""

    def __init__(self, share_context: Callable, sum: Callable):
        self.share_context, self.sum = share_context, sum


def _whole(fn, x, on_tile):
    y = fn(x).float()
    if on_tile is not None:
        on_tile()
    return y


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _decoder(vae):
    def decode(z):
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)

    return decode


def _encoder_mean(vae):
    def encode(x):
        moments = vae.encoder(x)
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
        return moments[:, : moments.shape[1] // 2]

    return encode


def decode_tiled(vae, latents: torch.Tensor, grid: TileGrid | None, context_size: int,
                 on_tile: Callable | None = None, tiles: list[int] | None = None,
                 spread: TileSpread | None = None) -> torch.Tensor:
    """Decode (B, c, h, w) latents (already divided by the scaling factor, in the VAE's dtype) into a
    float32 (B, 3, h * f, w * f) image, f the VAE factor. ``grid``: tiles over (h, w), or None to
    decode in one go. ``context_size``: the longest side (latent pixels) of the context pass.
    ``on_tile`` is called after each tile (once when not tiled). ``tiles``: the tile indices this
    process decodes (None: all); ``spread`` shares the context and sums the processes' parts."""
    decode = _decoder(vae)
    if grid is None or len(grid) == 1:
        return _whole(decode, latents, on_tile)
    context = _downscaled(latents, context_shape(*latents.shape[-2:], context_size))
    return _tiled_with_context(decode, vae.decoder, latents, context, grid, 1, vae_scale_factor(vae),
                               vae.config.out_channels, on_tile, tiles, spread)


def encode_tiled(vae, image: torch.Tensor, grid: TileGrid | None, context_size: int,
                 on_tile: Callable | None = None, tiles: list[int] | None = None,
                 spread: TileSpread | None = None) -> torch.Tensor:
    """Encode a (B, 3, H, W) image (in [-1, 1], the VAE's dtype) into the float32 (B, c, H / f, W / f)
    mean of its latent distribution (not yet times the scaling factor). ``grid``: tiles over the
    latent (H / f, W / f), or None to encode in one go; ``context_size`` in latent pixels; ``tiles``
    and ``spread`` as for ``decode_tiled``."""
    encode = _encoder_mean(vae)
    if grid is None or len(grid) == 1:
        return _whole(encode, image, on_tile)
    f = vae_scale_factor(vae)
    h, w = context_shape(image.shape[-2] // f, image.shape[-1] // f, context_size)
    context = _downscaled(image, (h * f, w * f))
    return _tiled_with_context(encode, vae.encoder, image, context, grid, f, 1, vae.config.latent_channels, on_tile,
                               tiles, spread)
