"""GSPN-2 in place of self-attention: a diffusers attention processor.

``GSPN2AttnProcessor`` is an ``nn.Module`` with the call signature diffusers gives attention processors,
so ``Attention.set_processor`` / ``unet.set_attn_processor`` accept it. It replaces self-attention
(``attn1``) only. Shapes (B batch, N = H * W tokens, C the layer's width, Cp the proxy width, G gate
groups):

    tokens (B, N, C) --down--> proxy (B, N, Cp) --> channel-major (B, Cp, H, W)
    1x1 conv of the proxy --> gates (B, 4, 3, G, H, W), lam (B, 4, Cp, H, W), u (B, 4, Cp, H, W)
    gspn_propagate(proxy, gates, lam, u / n) --> (B, 4, Cp, H, W) --sum over directions + skip * proxy-->
    (B, Cp, H, W) --> tokens (B, N, Cp) --up--> (B, N, C) --> attn.to_out (the layer's own projection)

Without autograd (``torch.no_grad`` / ``inference_mode``, or nothing requiring grad) the processor runs
``mix_inference``: the same computation in fewer kernels, with biases carried inside the GEMMs, and, after
``fuse_projections()``, ``up`` folded into the layer's ``to_out[0]``. Training runs ``mix``.

The token grid (H, W) of (B, N, C) tokens is not passed by diffusers; ``GSPNAdapter.mount`` sets
``processor.grid`` before every call through ``gspn_diffusers.token_grid.hand_over_grid`` (or set it
yourself, or call the processor with (B, C, H, W) input, whose grid is its shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import gspn_propagate

NUM_DIRECTIONS = 4
NUM_TAPS = 3
_MAX_CACHED_GRIDS = 16
# Channels appended to the proxy of the inference path: the first is 1 and carries the next GEMM's bias,
# the others meet zero weights; 8 keeps 16-bit rows 16-byte aligned for the GEMMs.
_BIAS_CHANNELS = 8


def proxy_width(query_dim: int, proxy_ratio: int) -> int:
    """The proxy's channel count Cp = C // proxy_ratio (at least 1)."""
    if proxy_ratio < 1:
        raise ValueError(f"proxy_ratio must be >= 1, got {proxy_ratio}")
    return max(1, query_dim // proxy_ratio)


def scan_counts(height: int, width: int, chunk_size: int | None) -> torch.Tensor:
    """(4, H, W) float32: n_d(t) = (t mod chunk) + 1, the lines direction d has accumulated at t.

    t is the scan index of the direction table of docs/op.md (w, W-1-w, h, H-1-h); a direction scanning T
    lines with ``chunk_size=None`` uses chunk = T.
    """
    cols = torch.arange(width, dtype=torch.float32).expand(height, width)
    rows = torch.arange(height, dtype=torch.float32).unsqueeze(1).expand(height, width)
    scan_index = torch.stack([cols, width - 1 - cols, rows, height - 1 - rows])
    lines = torch.tensor([width, width, height, height], dtype=torch.float32).view(4, 1, 1)
    chunk = lines if chunk_size is None else torch.full_like(lines, chunk_size)
    return torch.remainder(scan_index, chunk) + 1


class GSPN2AttnProcessor(nn.Module):
    """GSPN-2 line-scan propagation as a self-attention processor.

    Args:
        query_dim: C, the width of the tokens the layer receives (``attn.to_q.in_features``); the
            layer's ``to_out[0]`` must take C inputs too (true of every SDXL ``attn1``).
        proxy_dim: Cp, the width the propagation runs at.
        gate_groups: G, gate maps shared by Cp / G channels each (1: GSPN-2's channel-shared gates).
        chunk_size: None propagates across the whole image; K restarts every K lines (local).

    Parameters: ``down`` (Linear C -> Cp), ``coefficients`` (1x1 Conv2d Cp -> 12G + 8Cp, output
    channels ordered gates (4, 3, G), lam (4, Cp), u (4, Cp)), ``skip`` (Cp,), ``up`` (Linear Cp -> C).
    The four directions are merged by summing them: u's per-(direction, channel) bias is the learned
    merge weight, so there are no separate merge parameters. u is divided by n_d(t)
    (``scan_counts``) so that each direction's output stays a weighted mean of its cone, whose
    magnitude does not grow with the scan length (2048 lines at 16K).

    What a fresh processor computes. Both constructors leave the coefficient head neutral: conv weight
    0, gate logits 0 (equal taps), lam 1, u 1/4, skip 0. Since every row of the propagation matrix
    sums to one, each direction then outputs the running mean of the proxy over its cone, and the
    output is ``to_out(up(mean over the four directions of those means))``: every token receives a
    positive-weight average of (projected) tokens, like an attention that ignores the query.

    - ``from_attention(attn)`` (the student's init) makes the value path as the layer's output sees it,
      ``W_out @ up @ down``, the best rank-Cp approximation of the teacher's ``W_out @ W_v``
      (``attn.to_out[0]`` after ``attn.to_v``; truncated SVD ``U S V^T``: ``down = sqrt(S) V^T``,
      ``up = W_v V / sqrt(S)``, to_v's bias into ``up.bias``). The layer then outputs
      ``to_out(W_v,r @ cone average of the tokens)``, the same form as softmax attention's
      ``to_out(W_v @ attention-weighted average of the tokens)``, so the student starts near its
      teacher and distillation only has to learn where to look. Truncating the product rather than
      ``W_v`` alone keeps the directions ``to_out`` amplifies: it is the best rank-Cp value path for the
      layer's output (Eckart-Young), not for the values.
    - ``GSPN2AttnProcessor(query_dim, proxy_dim, ...)`` gives ``down`` / ``up`` PyTorch's default
      random init; use it to load trained weights.

    Parameters are float32 unless moved; at call time they are cast to the dtype of the tensors
    they meet, so a float16 / bfloat16 UNet works with float32 processor weights.

    Inference: calls that need no gradient run ``mix_inference`` with weights prepared once per dtype
    (rebuilt whenever a parameter they come from changes). ``fuse_projections()`` also folds ``up``
    into the layer's ``to_out[0]`` there (one GEMM instead of two). Neither is ever used when a
    gradient is needed, and neither is saved: ``state_dict()`` holds the parameters only.
    """

    def __init__(self, query_dim: int, proxy_dim: int, gate_groups: int = 1, chunk_size: int | None = None):
        super().__init__()
        if proxy_dim < 1 or gate_groups < 1 or proxy_dim % gate_groups != 0:
            raise ValueError(
                f"gate_groups ({gate_groups}) must divide the proxy width ({proxy_dim}), both >= 1"
            )
        self.query_dim = query_dim
        self.proxy_dim = proxy_dim
        self.gate_groups = gate_groups
        self.chunk_size = chunk_size
        self.down = nn.Linear(query_dim, proxy_dim)
        self.coefficients = nn.Conv2d(proxy_dim, self._num_gate_channels() + 8 * proxy_dim, kernel_size=1)
        self.skip = nn.Parameter(torch.zeros(proxy_dim))
        self.up = nn.Linear(proxy_dim, query_dim)
        self.grid: tuple[int, int] | None = None
        self.projections_fused = False
        self._counts_cache: dict[tuple, torch.Tensor] = {}
        self._inference_cache: tuple | None = None  # (key, _InferenceWeights); not state, never saved
        self.reset_coefficients()

    @property
    def chunk_size(self) -> int | None:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {value!r}")
        self._chunk_size = value

    def _num_gate_channels(self) -> int:
        return NUM_DIRECTIONS * NUM_TAPS * self.gate_groups

    @classmethod
    def from_attention(
        cls, attn: nn.Module, proxy_ratio: int = 8, gate_groups: int = 1, chunk_size: int | None = None
    ) -> "GSPN2AttnProcessor":
        """A float32 processor for ``attn`` (a diffusers ``Attention``) initialised from its weights."""
        query_dim = attn.to_q.in_features
        processor = cls(query_dim, proxy_width(query_dim, proxy_ratio), gate_groups, chunk_size)
        processor.init_from_attention(attn)
        return processor.to(attn.to_v.weight.device)

    @torch.no_grad()
    def reset_coefficients(self) -> None:
        """Neutral coefficient head: equal taps, lam 1, u 1/4 (the mean of the directions), skip 0."""
        gate_channels = self._num_gate_channels()
        lam_end = gate_channels + NUM_DIRECTIONS * self.proxy_dim
        self.coefficients.weight.zero_()
        self.coefficients.bias[:gate_channels].zero_()
        self.coefficients.bias[gate_channels:lam_end].fill_(1.0)
        self.coefficients.bias[lam_end:].fill_(1.0 / NUM_DIRECTIONS)
        self.skip.zero_()

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module) -> None:
        """Make ``W_out @ up @ down`` the rank-Cp truncation of ``W_out @ W_v`` and reset the coefficients."""
        value = attn.to_v.weight
        expected = (self.query_dim, self.query_dim)
        if tuple(value.shape) != expected or attn.to_out[0].in_features != self.query_dim:
            raise ValueError(
                f"GSPN2AttnProcessor needs a self-attention with to_v {expected} and to_out[0] taking "
                f"{self.query_dim}; got to_v {tuple(value.shape)}, to_out[0] {attn.to_out[0].in_features}"
            )
        value = value.detach().float()
        _, singular, right_t = torch.linalg.svd(attn.to_out[0].weight.detach().float() @ value, full_matrices=False)
        rank = self.proxy_dim
        # up @ down = W_v V_r V_r^T whatever the split, so W_out @ up @ down = M V_r V_r^T = U_r S_r V_r^T
        # (M = W_out W_v); sqrt(S_r) only balances the two, floored so that a rank-deficient M divides by no 0.
        root = singular[:rank].clamp_min(1e-4 * singular[0]).clamp_min(1e-12).sqrt()
        self.down.weight.copy_(root[:, None] * right_t[:rank])
        self.down.bias.zero_()
        self.up.weight.copy_(value @ right_t[:rank].T / root[None, :])
        if attn.to_v.bias is not None:
            self.up.bias.copy_(attn.to_v.bias)
        else:
            self.up.bias.zero_()
        self.reset_coefficients()

    def inverse_scan_counts(self, height: int, width: int, device, dtype) -> torch.Tensor:
        """(4, 1, H, W) 1 / n_d(t) for this processor's chunk size, cached per grid, device and dtype."""
        key = (height, width, self.chunk_size, device, dtype)
        cached = self._counts_cache.get(key)
        if cached is None:
            if len(self._counts_cache) >= _MAX_CACHED_GRIDS:
                self._counts_cache.clear()
            counts = scan_counts(height, width, self.chunk_size)
            cached = counts.reciprocal().unsqueeze(1).to(device=device, dtype=dtype)
            self._counts_cache[key] = cached
        return cached

    def split_coefficients(self, coefficients: torch.Tensor):
        """(B, 12G + 8Cp, H, W) conv output -> gates (B, 4, 3, G, H, W), lam, u (B, 4, Cp, H, W).

        Views, no copies: each is dense within a batch item (batch stride 12G + 8Cp planes).
        """
        batch, _, height, width = coefficients.shape
        gate_channels = self._num_gate_channels()
        gates, lam, u = coefficients.split(
            [gate_channels, NUM_DIRECTIONS * self.proxy_dim, NUM_DIRECTIONS * self.proxy_dim], dim=1
        )
        gates = gates.view(batch, NUM_DIRECTIONS, NUM_TAPS, self.gate_groups, height, width)
        lam = lam.view(batch, NUM_DIRECTIONS, self.proxy_dim, height, width)
        u = u.view(batch, NUM_DIRECTIONS, self.proxy_dim, height, width)
        return gates, lam, u

    def mix(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The core: (B, N, C) tokens on an (H, W) grid (row-major, N = H * W) -> (B, N, C).

        Everything between the layer's input (after its norms) and its ``to_out``.
        """
        batch, num_tokens, _ = tokens.shape
        height, width = grid
        proxy = F.linear(tokens, self.down.weight.to(tokens.dtype), self.down.bias.to(tokens.dtype))
        dtype = proxy.dtype  # differs from tokens' under autocast
        proxy = proxy.transpose(1, 2).unflatten(2, (height, width)).contiguous()  # (B, Cp, H, W)
        coefficients = F.conv2d(
            proxy, self.coefficients.weight.to(dtype), self.coefficients.bias.to(dtype)
        )
        gates, lam, u = self.split_coefficients(coefficients)
        u = u * self.inverse_scan_counts(height, width, u.device, u.dtype)
        directions = gspn_propagate(proxy, gates, lam, u, chunk_size=self.chunk_size, backend="auto")
        merged = directions.sum(dim=1) + self.skip.to(dtype).view(-1, 1, 1) * proxy
        merged = merged.flatten(2).transpose(1, 2)  # (B, N, Cp)
        return F.linear(merged, self.up.weight.to(merged.dtype), self.up.bias.to(merged.dtype))

    def fuse_projections(self) -> None:
        """Fold ``up`` into the layer's ``to_out[0]`` on calls that need no gradient.

        ``to_out[0](up(m)) = (W_out W_up) m + (W_out b_up + b_out)``: one (C, Cp) GEMM replaces a (C, Cp)
        and a (C, C) one. The folded weights are rebuilt when ``up`` or ``to_out[0]`` change, are never
        used when a gradient is needed (training runs the two layers), and are never saved. Layers whose
        ``to_out[0]`` is not a plain ``nn.Linear`` or carries forward hooks are left unfolded.
        Like diffusers' ``fuse_qkv_projections``.
        """
        self.projections_fused = True

    def unfuse_projections(self) -> None:
        """Undo ``fuse_projections``: ``up`` and ``to_out[0]`` run as two layers again."""
        self.projections_fused = False

    def _needs_autograd(self, tokens: torch.Tensor, out_proj: nn.Module) -> bool:
        if not torch.is_grad_enabled():
            return False
        if tokens.requires_grad or any(p.requires_grad for p in self.parameters()):
            return True
        return any(p.requires_grad for p in out_proj.parameters())

    def _foldable(self, out_proj: nn.Module) -> bool:
        return (
            self.projections_fused
            and type(out_proj) is nn.Linear
            and not out_proj._forward_hooks
            and not out_proj._forward_pre_hooks
        )

    def inference_weights(self, dtype: torch.dtype, out_proj: nn.Linear | None = None) -> "_InferenceWeights":
        """The weights ``mix_inference`` runs with, in ``dtype``; ``out_proj``: the ``to_out[0]`` to fold in.

        Cached for the last (dtype, out_proj) and rebuilt when any source parameter is replaced or
        modified in place (its version counter moves).
        """
        sources = [self.down.weight, self.down.bias, self.coefficients.weight, self.coefficients.bias,
                   self.skip, self.up.weight, self.up.bias]
        if out_proj is not None:
            sources += [out_proj.weight, out_proj.bias]
        key = (dtype, *((None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)) for t in sources))
        cached = self._inference_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        weights = _InferenceWeights.build(self, dtype, out_proj)
        self._inference_cache = (key, weights)
        return weights

    def mix_inference(self, tokens: torch.Tensor, grid: tuple[int, int], weights: "_InferenceWeights") -> torch.Tensor:
        """``mix`` without autograd, in fewer kernels: (B, N, C) tokens -> (B, N, C).

        With ``weights`` from ``inference_weights(dtype, attn.to_out[0])`` the result already includes
        ``to_out[0]``. Biases ride inside the GEMMs on a constant-1 proxy channel; the channel-major
        proxy is read in place by the coefficient GEMM; u's 1 / n_d(t) is applied in place; the
        direction sum and the skip term are written straight into the input of the last GEMM.
        """
        batch, num_tokens, _ = tokens.shape
        height, width = grid
        cp = self.proxy_dim
        rows = F.linear(tokens, weights.down_weight, weights.down_bias)  # (B, N, Cp + 8), channel Cp is 1
        coefficients = torch.bmm(weights.coefficient_weight.expand(batch, -1, -1), rows.mT)  # (B, 12G + 8Cp, N)
        proxy = rows[..., :cp].mT.unflatten(2, (height, width)).contiguous()  # (B, Cp, H, W)
        gates, lam, u = self.split_coefficients(coefficients.unflatten(2, (height, width)))
        u.mul_(self.inverse_scan_counts(height, width, u.device, u.dtype))
        directions = gspn_propagate(proxy, gates, lam, u, chunk_size=self.chunk_size, backend="auto")
        merged = proxy.new_empty(batch, cp + _BIAS_CHANNELS, num_tokens)
        merged[:, cp:].fill_(1.0)  # channel Cp carries the bias; the rest meet zero weights
        mixed = merged[:, :cp]
        torch.sum(directions.flatten(3), dim=1, out=mixed)
        mixed.addcmul_(weights.skip.view(-1, 1), proxy.flatten(2))
        return torch.bmm(merged.mT, weights.out_weight.mT.expand(batch, -1, -1))  # (B, N, C)

    def _grid_of(self, num_tokens: int) -> tuple[int, int]:
        grid = self.grid
        if grid is None or grid[0] * grid[1] != num_tokens:
            raise RuntimeError(
                f"GSPN2AttnProcessor got {num_tokens} tokens but its grid is {grid}: it needs the token "
                "grid (H, W) of each call. Mount it with GSPNAdapter.mount(unet), or set processor.grid."
            )
        return grid

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Spelled out (not inherited from nn.Module) because Attention.forward filters the keyword
        # arguments it passes by the signature of processor.__call__; nn.Module's routes to forward.
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """Self-attention replacement: (B, N, C) or (B, C, H, W) in, the same shape out.

        The surroundings (spatial_norm, group_norm, to_out, residual_connection,
        rescale_output_factor) are applied as diffusers' ``AttnProcessor2_0`` applies them.
        """
        if encoder_hidden_states is not None:
            raise ValueError("GSPN2AttnProcessor replaces self-attention only; got encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError("GSPN2AttnProcessor cannot apply an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            grid = tuple(image_shape[2:])
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        else:
            grid = self._grid_of(hidden_states.shape[1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        out_proj = attn.to_out[0]
        if self._needs_autograd(hidden_states, out_proj) or torch.is_autocast_enabled(hidden_states.device.type):
            hidden_states = out_proj(self.mix(hidden_states, grid))
        else:
            folded = out_proj if self._foldable(out_proj) else None
            weights = self.inference_weights(hidden_states.dtype, folded)
            hidden_states = self.mix_inference(hidden_states, grid, weights)
            if folded is None:
                hidden_states = out_proj(hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:  # x / 1.0 == x: one pass over (B, N, C) saved
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, proxy_dim={self.proxy_dim}, gate_groups={self.gate_groups}, "
            f"chunk_size={self.chunk_size}, grid={self.grid}, projections_fused={self.projections_fused}"
        )


class _InferenceWeights:
    """A processor's weights in the form ``mix_inference`` uses, in one dtype (Cp8 = Cp + 8).

    down_weight (Cp8, C), down_bias (Cp8,): ``down`` with a constant-1 channel Cp and zero channels after.
    coefficient_weight (12G + 8Cp, Cp8): the 1x1 conv, its bias in column Cp.
    out_weight (C, Cp8): ``up`` (or ``to_out[0] . up``), its bias in column Cp.
    skip (Cp,).
    """

    __slots__ = ("down_weight", "down_bias", "coefficient_weight", "out_weight", "skip")

    @classmethod
    @torch.no_grad()
    def build(cls, processor: GSPN2AttnProcessor, dtype: torch.dtype, out_proj: nn.Linear | None):
        acc = torch.promote_types(dtype, torch.float32)
        down_w, down_b = processor.down.weight.to(acc), processor.down.bias.to(acc)
        extra = _BIAS_CHANNELS - 1
        one = down_b.new_ones(1)

        def with_bias_column(weight, bias):
            return torch.cat([weight, bias[:, None], weight.new_zeros(weight.shape[0], extra)], dim=1)

        out_w, out_b = processor.up.weight.to(acc), processor.up.bias.to(acc)
        if out_proj is not None:
            proj_w = out_proj.weight.to(acc)
            out_b = proj_w @ out_b
            if out_proj.bias is not None:
                out_b = out_b + out_proj.bias.to(acc)
            out_w = proj_w @ out_w
        conv_w = processor.coefficients.weight.to(acc).flatten(1)
        weights = cls()
        weights.down_weight = torch.cat([down_w, down_w.new_zeros(_BIAS_CHANNELS, down_w.shape[1])]).to(dtype)
        weights.down_bias = torch.cat([down_b, one, down_b.new_zeros(extra)]).to(dtype)
        weights.coefficient_weight = with_bias_column(conv_w, processor.coefficients.bias.to(acc)).to(dtype)
        weights.out_weight = with_bias_column(out_w, out_b).to(dtype)
        weights.skip = processor.skip.to(acc).to(dtype)
        return weights
