"""The token grid (H, W) of each self-attention call, handed to whatever needs it.

diffusers flattens a ``Transformer2DModel``'s (B, C, H, W) input to (B, H * W, C) tokens before its
attention layers run, so a processor called with tokens cannot know the grid. ``hand_over_grid``
installs one forward pre-hook on every ``Transformer2DModel`` that holds the named layers; before each
of its forwards, the hook sets ``receiver.grid = (H, W)`` (None for a non-image input) on the receiver
of every layer inside. ``GSPNAdapter.mount`` uses it for its processors; anything else with a ``grid``
attribute (e.g. a hook recording activations) can receive the grid the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from diffusers import Transformer2DModel
from torch import nn
from torch.utils.hooks import RemovableHandle


def _set_grid(receivers: list, module, args, kwargs) -> None:
    hidden_states = args[0] if args else kwargs["hidden_states"]
    grid = tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4 else None
    for receiver in receivers:
        receiver.grid = grid


def hand_over_grid(model: nn.Module, receivers: Mapping[str, object]) -> list[RemovableHandle]:
    """Set ``receivers[layer].grid`` before every forward of the ``Transformer2DModel`` holding ``layer``.

    Args:
        model: the UNet (or any module) whose ``named_modules()`` paths name the layers.
        receivers: {layer module path (e.g. "mid_block.attentions.0.transformer_blocks.0.attn1"): an
            object with a writable ``grid`` attribute}.

    Returns the hook handles (``handle.remove()`` uninstalls). ValueError naming a layer that is not
    inside a ``Transformer2DModel`` of ``model`` (its grid would be unknown); nothing is installed then.
    """
    plan, covered = [], set()
    for name, module in model.named_modules():
        if isinstance(module, Transformer2DModel):
            inside = [layer for layer in receivers if layer.startswith(name + ".")]
            if inside:
                plan.append((module, [receivers[layer] for layer in inside]))
                covered.update(inside)
    outside = [layer for layer in receivers if layer not in covered]
    if outside:
        raise ValueError(f"layer {outside[0]!r} is not inside a Transformer2DModel, so its token grid is unknown")
    return [module.register_forward_pre_hook(partial(_set_grid, inside), with_kwargs=True) for module, inside in plan]
