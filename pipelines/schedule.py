"""The scheduler's schedule for a stage: the default one of ``num_inference_steps``, or given timesteps or
sigmas (Align-Your-Steps, LCM's, ...), and the cut of ``denoising_end``."""

from __future__ import annotations

import torch


def set_schedule(scheduler, num_inference_steps: int, device, custom: dict) -> None:
    """Set ``scheduler``'s timesteps: ``custom`` is {} (``num_inference_steps`` of the scheduler's own
    spacing), {"timesteps": [...]} or {"sigmas": [...]}. Follows diffusers' ``retrieve_timesteps``."""
    if custom:
        scheduler.set_timesteps(device=device, **custom)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)


def custom_schedule_steps(scheduler, custom: dict) -> int:
    """Steps of a given schedule (its timesteps per scheduler order), as the plan counts steps."""
    set_schedule(scheduler, 0, "cpu", custom)
    order = getattr(scheduler, "order", 1)
    return -(-len(scheduler.timesteps) // order)


def cut_at_denoising_end(timesteps: torch.Tensor, denoising_end: float | None, num_train_timesteps: int) -> torch.Tensor:
    """The timesteps at or above the noise level where ``denoising_end`` of the denoising is done.

    Follows StableDiffusionXLPipeline.__call__'s "Apply denoising_end" step (diffusers 0.42): a refiner
    called with ``denoising_start=denoising_end`` continues from the first timestep cut off.
    """
    if denoising_end is None or denoising_end >= 1:
        return timesteps
    cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
    return timesteps[: int((timesteps >= cutoff).sum())]
