"""Losses of the distillation and the hooks that read each attn1 layer of the shared UNet.

Every loss is computed per sample first and averaged last, so a global batch gives the same value
whether it is one process's batch or split over several processes (DDP averages the processes).
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from gspn_diffusers.token_grid import hand_over_grid

FEATURE_EPS = 1e-8


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict, following ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the model's scheduler config")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of each sample, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def relative_feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B,) ||s - t||^2 / ||t||^2 per sample: a layer's squared relative error, scale-free across layers."""
    student, teacher = student.float().flatten(1), teacher.float().flatten(1)
    return (student - teacher).pow(2).sum(1) / (teacher.pow(2).sum(1) + FEATURE_EPS)


def feature_losses(student: dict, teacher: dict, layers: list[str]) -> torch.Tensor:
    """(L, B) relative feature loss of every layer, in ``layers`` order."""
    return torch.stack([relative_feature_loss(student[layer], teacher[layer]) for layer in layers])


class AttentionTap:
    """Forward hooks on the attn1 modules of the UNet: they see whatever processor is in place.

    Idle unless inside ``capture()``, so a gradient-checkpointing recomputation during backward
    records nothing. ``capture(inputs=True)`` also records each layer's input tokens and their grid
    (H, W), handed over by ``hand_over_grid`` as it is to the mounted processors (what the layerwise
    stage feeds the processors).
    """

    def __init__(self, unet: nn.Module, modules: dict[str, nn.Module]):
        self.layers = list(modules)
        self.modules = modules
        self._outputs: dict | None = None
        self._inputs: dict | None = None
        self._grids: dict | None = None
        self._grid_of = {layer: SimpleNamespace(grid=None) for layer in modules}
        self._handles = hand_over_grid(unet, self._grid_of)
        for layer, module in modules.items():
            self._handles.append(module.register_forward_hook(self._output_hook(layer)))
            self._handles.append(module.register_forward_pre_hook(self._input_hook(layer), with_kwargs=True))

    def _output_hook(self, layer):
        def hook(module, args, output):
            if self._outputs is not None:
                self._outputs[layer] = output

        return hook

    def _input_hook(self, layer):
        def hook(module, args, kwargs):
            if self._inputs is not None:
                self._inputs[layer] = args[0] if args else kwargs["hidden_states"]
                self._grids[layer] = self._grid_of[layer].grid

        return hook

    @contextmanager
    def capture(self, inputs: bool = False):
        """``with tap.capture() as seen: unet(...)``; then ``seen["outputs"][layer]`` (and inputs, grids)."""
        seen = dict(outputs={}, inputs={}, grids={})
        self._outputs = seen["outputs"]
        if inputs:
            self._inputs, self._grids = seen["inputs"], seen["grids"]
        try:
            yield seen
        finally:
            self._outputs = self._inputs = self._grids = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
