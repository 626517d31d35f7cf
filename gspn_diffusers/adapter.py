"""``GSPNAdapter``: the GSPN-2 processors of one UNet, saved, loaded and mounted as a diffusers model.

Layers are named by the module path of their self-attention, as in ``unet.named_modules()``, e.g.
``"down_blocks.1.attentions.0.transformer_blocks.0.attn1"``; the key of that layer in
``unet.attn_processors`` is the path plus ``".processor"``.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .processor import GSPN2AttnProcessor, proxy_width
from .token_grid import hand_over_grid

_PROCESSOR_SUFFIX = ".processor"


def self_attention_layers(unet: nn.Module) -> list[str]:
    """Module paths of every ``attn1`` self-attention (not cross-attention) of ``unet``."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.split(".")[-1] == "attn1" and not module.is_cross_attention
    ]


@dataclass
class _Mount:
    unet: weakref.ref
    original_processors: dict
    hooks: list
    options: dict  # mount's keyword arguments, for mounting again the same way


class GSPNAdapter(ModelMixin, ConfigMixin):
    """One ``GSPN2AttnProcessor`` per replaced self-attention layer of a UNet.

    Args:
        layers: module paths of the replaced ``attn1`` layers (see the module docstring).
        query_dims: the width C of each layer.
        proxy_ratio: the proxy width is C // proxy_ratio.
        gate_groups: gate groups G of every processor (must divide each proxy width).
        chunk_sizes: per layer, None (global propagation) or K (restart every K lines); None for all
            global.

    The processors live in ``self.processors`` (an ``nn.ModuleList`` in ``layers`` order; weights are
    saved as ``processors.{i}.*``). ``adapter[layer]`` and ``processors_by_layer()`` give them by name.
    ``save_pretrained`` / ``from_pretrained`` (ModelMixin) write and read ``config.json`` and
    safetensors weights, from a local folder or a Hub id.

    While mounted, the processors are also submodules of the UNet (diffusers registers an
    ``nn.Module`` processor under ``attn.processor``): they appear in ``unet.parameters()`` and
    ``unet.state_dict()``, and ``unet.requires_grad_`` / ``unet.to`` reach them. ``unmount`` removes
    them again.
    """

    @register_to_config
    def __init__(
        self,
        layers: list[str],
        query_dims: list[int],
        proxy_ratio: int = 8,
        gate_groups: int = 1,
        chunk_sizes: list[int | None] | None = None,
    ):
        super().__init__()
        chunk_sizes = [None] * len(layers) if chunk_sizes is None else list(chunk_sizes)
        if not (len(layers) == len(query_dims) == len(chunk_sizes)):
            raise ValueError(
                f"layers ({len(layers)}), query_dims ({len(query_dims)}) and chunk_sizes "
                f"({len(chunk_sizes)}) must have one entry per layer"
            )
        if len(set(layers)) != len(layers):
            raise ValueError("layers must not repeat")
        self.processors = nn.ModuleList(
            GSPN2AttnProcessor(dim, proxy_width(dim, proxy_ratio), gate_groups, chunk)
            for dim, chunk in zip(query_dims, chunk_sizes)
        )
        self._mount: _Mount | None = None

    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        proxy_ratio: int = 8,
        gate_groups: int = 1,
        chunk_size: int | None | dict[str, int | None] = None,
    ) -> "GSPNAdapter":
        """An adapter for every ``attn1`` of ``unet``, each processor initialised from its teacher layer.

        ``chunk_size`` is one value for all layers or a dict {layer: chunk} (layers left out: None).
        The adapter is float32, on the UNet's device; the UNet is not modified.
        """
        layers = self_attention_layers(unet)
        if not layers:
            raise ValueError("this model has no attn1 self-attention layers")
        if isinstance(chunk_size, dict):
            unknown = sorted(set(chunk_size) - set(layers))
            if unknown:
                raise ValueError(f"chunk_size names layers that are not attn1 of this UNet: {unknown}")
            chunk_sizes = [chunk_size.get(layer) for layer in layers]
        else:
            chunk_sizes = [chunk_size] * len(layers)
        modules = [unet.get_submodule(layer) for layer in layers]
        adapter = cls(
            layers=layers,
            query_dims=[module.to_q.in_features for module in modules],
            proxy_ratio=proxy_ratio,
            gate_groups=gate_groups,
            chunk_sizes=chunk_sizes,
        )
        for processor, module in zip(adapter.processors, modules):
            processor.init_from_attention(module)
        return adapter.to(modules[0].to_v.weight.device)

    def processors_by_layer(self) -> dict[str, GSPN2AttnProcessor]:
        """{layer path: processor}, in config order."""
        return dict(zip(self.config.layers, self.processors))

    def fuse_projections(self) -> None:
        """Fold every processor's ``up`` into its layer's ``to_out[0]`` for inference.

        Each replaced layer then runs one (C, Cp) GEMM where it ran ``up`` and ``to_out[0]``. Only calls
        that need no gradient use the folded weights (training runs the two layers, exactly); they follow
        later changes to ``up`` or ``to_out[0]`` and are never saved. Follows diffusers'
        ``fuse_qkv_projections``; ``unfuse_projections`` undoes it.
        """
        for processor in self.processors:
            processor.fuse_projections()

    def unfuse_projections(self) -> None:
        """Run ``up`` and ``to_out[0]`` as two layers again (see ``fuse_projections``)."""
        for processor in self.processors:
            processor.unfuse_projections()

    def __getitem__(self, layer: str) -> GSPN2AttnProcessor:
        try:
            return self.processors[self.config.layers.index(layer)]
        except ValueError:
            raise KeyError(layer) from None

    def attention_modules(self, unet: nn.Module) -> dict[str, Attention]:
        """{layer path: the unet's Attention module there}; ValueError naming a layer that does not fit.

        Use it to hook the same layers in teacher and student (``register_forward_hook`` on these
        modules sees softmax attention when unmounted and GSPN when mounted).
        """
        modules = dict(unet.named_modules())
        found = {}
        for layer, processor in self.processors_by_layer().items():
            module = modules.get(layer)
            if not isinstance(module, Attention):
                raise ValueError(f"GSPNAdapter: layer {layer!r} is not an attention layer of this UNet")
            if module.is_cross_attention:
                raise ValueError(f"GSPNAdapter: layer {layer!r} is cross-attention, not self-attention")
            width = module.to_q.in_features
            if width != processor.query_dim:
                raise ValueError(
                    f"GSPNAdapter: layer {layer!r} has width {width} in the UNet but {processor.query_dim} "
                    "in the adapter"
                )
            found[layer] = module
        return found

    @property
    def is_mounted(self) -> bool:
        return self._mount is not None

    def is_mounted_on(self, unet: nn.Module) -> bool:
        """Whether this adapter's processors are mounted on ``unet``."""
        return self._mount is not None and self._mount.unet() is unet

    def uncovered_layers(self, unet: nn.Module) -> list[str]:
        """The ``attn1`` layers of ``unet`` this adapter has no processor for (they would stay softmax)."""
        covered = set(self.config.layers)
        return [layer for layer in self_attention_layers(unet) if layer not in covered]

    def mount(self, unet: nn.Module, *, match_dtype: bool = True, partial: bool = False) -> "GSPNAdapter":
        """Swap the processors into ``unet`` (``set_attn_processor``) and install the grid hooks.

        Checks the fit first: every adapter layer must be an ``attn1`` of ``unet`` with the same width,
        and every ``attn1`` of ``unet`` must have a processor -- an adapter made for a UNet with fewer
        transformer layers is refused (ValueError naming the uncovered layers) unless ``partial=True``,
        which leaves those layers on softmax attention. Moves the processors to the UNet's device and,
        with ``match_dtype``, its dtype (pass False to keep float32 weights for training a
        half-precision UNet; they are cast per call). The UNet's own weights are not touched. Returns self.
        """
        if self._mount is not None:
            raise RuntimeError("GSPNAdapter is already mounted; unmount it first")
        self.attention_modules(unet)
        uncovered = self.uncovered_layers(unet)
        if uncovered and not partial:
            raise ValueError(
                f"GSPNAdapter covers {len(self.config.layers)} of this UNet's "
                f"{len(self.config.layers) + len(uncovered)} self-attention layers (it was made for another "
                f"UNet); these would stay softmax: {uncovered}. Pass partial=True to mount it anyway."
            )
        current = unet.attn_processors
        foreign = [key for key, p in current.items() if isinstance(p, GSPN2AttnProcessor)]
        if foreign:
            raise RuntimeError(
                f"this UNet already has a GSPN processor at {foreign[0]!r}; unmount that adapter first"
            )
        hooks = hand_over_grid(unet, self.processors_by_layer())
        reference = next(unet.parameters())
        dtype = reference.dtype if match_dtype else None
        for processor in self.processors:
            processor.to(device=reference.device, dtype=dtype)

        swapped = dict(current)
        for layer, processor in self.processors_by_layer().items():
            swapped[layer + _PROCESSOR_SUFFIX] = processor
        unet.set_attn_processor(swapped)
        self._mount = _Mount(weakref.ref(unet), current, hooks, {"match_dtype": match_dtype, "partial": partial})
        return self

    def unmount(self, unet: nn.Module) -> None:
        """Put back the exact processor objects ``mount`` found and remove the hooks."""
        if not self.is_mounted_on(unet):
            raise RuntimeError("GSPNAdapter is not mounted on this UNet")
        for hook in self._mount.hooks:
            hook.remove()
        unet.set_attn_processor(dict(self._mount.original_processors))
        for processor in self.processors:
            processor.grid = None
        self._mount = None

    @contextmanager
    def mounted(self, unet: nn.Module, *, match_dtype: bool = True, partial: bool = False):
        """``with adapter.mounted(unet): ...`` runs the block with GSPN, then restores the teacher."""
        self.mount(unet, match_dtype=match_dtype, partial=partial)
        try:
            yield self
        finally:
            self.unmount(unet)

    @contextmanager
    def unmounted(self, unet: nn.Module):
        """``with adapter.unmounted(unet): ...`` runs the block with the processors ``mount`` found (the
        teacher's softmax), then mounts again with the same options, also when the block raises.
        Fused projections and the processors' weights are kept. RuntimeError if not mounted on ``unet``."""
        if not self.is_mounted_on(unet):
            raise RuntimeError("GSPNAdapter is not mounted on this UNet")
        options = self._mount.options
        self.unmount(unet)
        try:
            yield self
        finally:
            self.mount(unet, **options)
