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

``TUNING`` says how the passes run on the device (memory format, cuDNN's algorithm search, the form of
the shared GroupNorm and of the tiles' attention); every setting gives the same output within the
rounding of the VAE's dtype (benchmarks/bench_vae.py measures them).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from .tiling import TileGrid, context_shape

CONTEXT_ATTENTION = ("processor", "sdpa", "matmul")


@dataclass(frozen=True)
class Tuning:
    """How the VAE's passes run (not what they compute).

    affine_norm: GroupNorms as one pass ``x * scale + shift`` with per-(image, channel) scale and shift
        from float32 statistics, in x's memory format: in the tiles with the shared statistics (otherwise
        (x - mean) * rstd, then the weight and the bias: four passes), and in the context pass with its
        own (otherwise ``nn.GroupNorm``). A decode or encode without tiles is never tuned.
    channels_last: the coder's convolution weights and its inputs in ``torch.channels_last`` (NHWC, the
        layout tensor-core convolutions work in) for the duration of a decode or encode; needs
        affine_norm.
    cudnn_benchmark: cuDNN times its convolution algorithms for each new shape and keeps the fastest.
    context_attention: how a tile's self-attention attends to the context's tokens. "processor": the
        layer's own processor with the tokens as ``encoder_hidden_states`` (keys and values projected
        again for every tile); "sdpa": keys and values projected once per decode, then
        ``F.scaled_dot_product_attention``; "matmul": the same keys and values, attention as two batched
        matmuls with float32 scores and softmax, in chunks of queries (SDPA's flash kernels take heads
        of at most 256; the VAE has one head of 512). Layers with a processor other than diffusers'
        default ones (or with a spatial, q/k or cross norm, or unscaled scores) always use "processor".
    """

    affine_norm: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    context_attention: str = "processor"

    def __post_init__(self):
        if self.channels_last and not self.affine_norm:
            raise ValueError("channels_last needs affine_norm: the four-pass normalise copies to NCHW, and so does "
                             "CUDA's GroupNorm (the CPU's loses precision in channels_last)")
        if self.context_attention not in CONTEXT_ATTENTION:
            raise ValueError(f"context_attention must be one of {CONTEXT_ATTENTION}; got {self.context_attention!r}")


# Measured on one H200 (bfloat16, benchmarks/bench_vae.py, 2026-12-03): 4096 px tiled decode 2.15 s as
# Tuning() -> 1.48 s with affine_norm (GroupNorm was 28% of the GPU time) -> 1.47 s channels_last -> 1.28 s
# with "matmul" context attention (the 512-wide head falls back from flash to a 2.5x slower kernel);
# cuDNN's algorithm search changed nothing.
TUNING = Tuning(affine_norm=True, channels_last=True, context_attention="matmul")

# Float32 attention scores held at once by the "matmul" attention: 2^28 elements, 1 GiB.
SCORE_ELEMENTS = 1 << 28


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
            if TUNING.affine_norm:
                return owner.normalise(self.key, self.norm, x)
        return self.norm(x)


class _ContextAttention:
    """Wraps an attention layer's processor: records the context's normalised tokens, then gives
    them to every tile as ``encoder_hidden_states`` (keys and values of the whole image)."""

    def __init__(self, processor, owner: "WholeImageContext", key: int):
        self.processor, self.owner, self.key = processor, owner, key

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs):
        mode = self.owner.mode
        if mode == "record":
            tokens = hidden_states.flatten(2) if hidden_states.ndim == 4 else hidden_states.transpose(1, 2)
            if attn.group_norm is not None:
                tokens = attn.group_norm(tokens)
            self.owner.context_tokens[self.key] = tokens.transpose(1, 2)
        if mode in ("record", "apply"):
            how = TUNING.context_attention
            if how != "processor" and self._plain(attn, hidden_states, attention_mask, kwargs):
                key, value = self.owner.keys_values(self.key, attn)
                return _attend(attn, hidden_states, key, value, how)
            if mode == "apply":
                encoder_hidden_states = self.owner.context_tokens[self.key]
        return self.processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, temb=temb, **kwargs)

    def _plain(self, attn: Attention, hidden_states, attention_mask, kwargs) -> bool:
        """Whether ``_attend`` computes what the wrapped processor would."""
        return (type(self.processor) in (AttnProcessor, AttnProcessor2_0) and hidden_states.ndim == 4
                and attention_mask is None and not kwargs and attn.spatial_norm is None and attn.norm_q is None
                and attn.norm_k is None and attn.norm_cross is None and attn.scale_qk)


def _attend(attn: Attention, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            how: str) -> torch.Tensor:
    """Self-attention layer ``attn`` on (B, C, H, W) hidden states whose keys and values (B, heads, M, d)
    come from elsewhere, keys already times d^-1/2. Follows diffusers' ``AttnProcessor2_0``."""
    b, c, h, w = hidden_states.shape
    tokens = hidden_states.flatten(2)
    if attn.group_norm is not None:
        tokens = attn.group_norm(tokens)
    query = attn.to_q(tokens.transpose(1, 2))
    query = query.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    if how == "sdpa":
        out = F.scaled_dot_product_attention(query, key, value, scale=1.0)
    else:
        out = _matmul_attention(query, key, value)
    out = out.transpose(1, 2).flatten(2).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    out = out.transpose(1, 2).unflatten(2, (h, w))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def _matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(query key^T) value for (B, heads, N, d) queries and (B, heads, M, d) keys and values:
    scores and softmax in float32, the weights rounded to the values' dtype for the second product (as
    flash attention does), at most ``SCORE_ELEMENTS`` scores at a time."""
    q, k, v = query.flatten(0, 1), key.flatten(0, 1).transpose(1, 2), value.flatten(0, 1)
    chunk = max(1, SCORE_ELEMENTS // (q.shape[0] * k.shape[2]))
    parts = []
    for start in range(0, q.shape[1], chunk):
        scores = _float32_bmm(q[:, start:start + chunk], k)
        parts.append(torch.bmm(torch.softmax(scores, dim=-1).to(v.dtype), v))
    return torch.cat(parts, dim=1).unflatten(0, query.shape[:2])


def _float32_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 (a, b: (n, i, k), (n, k, j)); half-precision inputs multiply at their own speed."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.bmm(a.float(), b.float())


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
        # Derived from the statistics or tokens (the first item), kept for all tiles.
        self._affine: dict[int, tuple] = {}
        self._keys_values: dict[int, tuple] = {}
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
        """Mean and variance of x (B, C, ...) per image and group of channels, in float32."""
        x = x.detach()
        channels_inner = x.movedim(1, -1)
        if x.ndim > 2 and channels_inner.is_contiguous():  # channels_last: group in place, no copy
            grouped, dims = channels_inner.reshape(x.shape[0], -1, norm.num_groups, x.shape[1] // norm.num_groups), (1, 3)
        else:
            grouped, dims = x.reshape(x.shape[0], norm.num_groups, -1), (2,)
        var, mean = torch.var_mean(grouped.float(), dim=dims, correction=0)
        self.statistics[key] = (mean, var)

    def normalise(self, key: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm of x (B, C, ...) with the recorded mean and variance, then its affine map."""
        if TUNING.affine_norm:
            scale, shift = self.affine(key, norm, x.dtype)
            view = scale.shape + (1,) * (x.ndim - 2)
            return torch.addcmul(shift.view(view), x, scale.view(view))
        mean, var = self.statistics[key]
        rstd = (var + norm.eps).rsqrt()
        y = x.reshape(x.shape[0], norm.num_groups, -1) - mean[..., None].to(x.dtype)
        y = y.mul_(rstd[..., None].to(x.dtype)).reshape(x.shape)
        if norm.affine:
            view = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            y = y.mul_(norm.weight.view(view).to(x.dtype)).add_(norm.bias.view(view).to(x.dtype))
        return y

    def affine(self, key: int, norm: nn.GroupNorm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, C) in ``dtype``, with norm(x) = x * scale + shift under the recorded
        statistics: scale = rstd * weight, shift = bias - mean * scale, computed in float32."""
        mean, var = self.statistics[key]
        cached = self._affine.get(key)
        if cached is not None and cached[0] is mean and cached[1] == dtype:
            return cached[2]
        per_group = norm.num_channels // norm.num_groups
        scale = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
        shift = -mean.repeat_interleave(per_group, dim=1) * scale
        if norm.affine:
            weight = norm.weight.detach().float()
            scale, shift = scale * weight, shift * weight + norm.bias.detach().float()
        pair = (scale.to(dtype), shift.to(dtype))
        self._affine[key] = (mean, dtype, pair)
        return pair

    def keys_values(self, key: int, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (times d^-1/2) and values (B, heads, M, d) of the context's tokens for the attention
        layer ``key``, projected once and kept."""
        tokens = self.context_tokens[key]
        cached = self._keys_values.get(key)
        if cached is not None and cached[0] is tokens:
            return cached[1]
        k, v = attn.to_k(tokens), attn.to_v(tokens)
        k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2).contiguous() for t in (k, v))
        k = (k.float() * k.shape[-1] ** -0.5).to(k.dtype)
        self._keys_values[key] = (tokens, (k, v))
        return k, v


@contextmanager
def _tuned(modules: list[nn.Module]):
    """``TUNING``'s memory format and cuDNN algorithm search for ``modules`` during the block: with
    channels_last, their 4D weights are swapped for channels_last copies and put back after."""
    swapped = []
    if TUNING.channels_last:
        for module in modules:
            for parameter in module.parameters():
                if parameter.ndim == 4 and not parameter.is_contiguous(memory_format=torch.channels_last):
                    swapped.append((parameter, parameter.data))
                    parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark or TUNING.cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        for parameter, data in swapped:
            parameter.data = data


def _laid_out(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) in ``TUNING``'s memory format."""
    return x.contiguous(memory_format=torch.channels_last) if TUNING.channels_last else x


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
        context = _laid_out(context)
        if spread is None:
            fn(context)
        else:
            spread.share_context(whole, lambda: fn(context))
        whole.mode = "apply"
        for index in range(len(grid)) if tiles is None else tiles:
            tile = grid.tiles[index]
            y = fn(_laid_out(x[(..., *tile.slices(in_scale))]))
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
    """fn(x) in one go, untuned: a decode or encode that needs no tiles is the VAE's own computation, bit
    for bit (the SDXL pipeline's output at the base size)."""
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
    with _tuned([m for m in (vae.post_quant_conv, vae.decoder) if m is not None]):
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
    with _tuned([m for m in (vae.encoder, vae.quant_conv) if m is not None]):
        f = vae_scale_factor(vae)
        h, w = context_shape(image.shape[-2] // f, image.shape[-1] // f, context_size)
        context = _downscaled(image, (h * f, w * f))
        return _tiled_with_context(encode, vae.encoder, image, context, grid, f, 1, vae.config.latent_channels,
                                   on_tile, tiles, spread)
