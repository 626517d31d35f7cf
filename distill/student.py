"""Teacher and student on one UNet, and the small module that DDP / accelerate wraps.

One copy of the UNet's weights serves both: the ``GSPNAdapter`` stays mounted (the student) for the
whole run, and the teacher pass unmounts it for the length of one ``torch.no_grad()`` forward
(``teacher_mode``), so the teacher is the original softmax UNet, exactly, and its activations are
never kept for backward. The student's backward runs while mounted, which gradient checkpointing
needs (it re-runs the forward of each checkpointed block during backward).

Multi-process training wraps only ``GSPNStudent`` -- a module whose only parameters are the adapter's
-- in DistributedDataParallel (``accelerator.prepare``). The frozen UNet is held beside it, not
registered as a submodule, so DDP never sees the UNet, never broadcasts or buckets its 2.6B frozen
weights, and mounting / unmounting never touches a DDP-wrapped module. Every student forward goes
through the wrapper, so DDP's reducer averages the adapter's gradients across processes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from gspn_diffusers.adapter import GSPNAdapter


@contextmanager
def teacher_mode(adapter: GSPNAdapter, unet: nn.Module):
    """The block runs the original softmax UNet (adapter unmounted) without autograd; remounts after."""
    adapter.unmount(unet)
    try:
        with torch.no_grad():
            yield
    finally:
        adapter.mount(unet, match_dtype=False)


class GSPNStudent(nn.Module):
    """The trainable part: the adapter (a registered submodule) and, beside it, the frozen UNet."""

    def __init__(self, adapter: GSPNAdapter, unet: nn.Module, tap):
        super().__init__()
        self.adapter = adapter
        self._frozen = (unet, tap)  # a tuple: not registered, so not part of parameters() or state_dict()

    @property
    def unet(self) -> nn.Module:
        return self._frozen[0]

    def forward(self, mode: str, **inputs):
        """``mode="unet"``: the student UNet forward -> (prediction, {layer: attn1 output}).

        ``mode="layerwise"``: each processor alone on its teacher layer's input tokens
        (``inputs["tokens"][layer]``, grid ``inputs["grids"][layer]``) -> {layer: output}.
        """
        unet, tap = self._frozen
        if not self.adapter.is_mounted:
            raise RuntimeError("GSPNStudent needs the adapter mounted on the UNet")
        if mode == "unet":
            with tap.capture() as seen:
                prediction = unet(**inputs).sample  # sample, timestep, encoder_hidden_states, added_cond_kwargs
            return prediction, seen["outputs"]
        if mode == "layerwise":
            outputs = {}
            for layer, processor in self.adapter.processors_by_layer().items():
                # image-shaped (B, C, H, W) input: the processor takes the grid from the shape
                image = inputs["tokens"][layer].transpose(1, 2).unflatten(2, inputs["grids"][layer])
                outputs[layer] = processor(tap.modules[layer], image).flatten(2).transpose(1, 2)
            return outputs
        raise ValueError(f"unknown mode {mode!r}")
