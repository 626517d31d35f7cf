"""Checks of ``GSPNStableDiffusionXLPipeline.__call__``'s arguments, run before any work.

Each check raises a ValueError that names the argument and the offending value. The checks that
need the pipeline's components (the text encoders' depth, the UNet's IP-Adapter, the scheduler) take
them as arguments, so this module holds no pipeline state.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch



def positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (bools excluded); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def optional_size(name: str, value, default: int) -> int:
    """``height`` / ``width``: ``default`` for None, otherwise a positive int (0 is not "default")."""
    return default if value is None else positive_int(name, value)


def real_in(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in [low, high] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be in {bounds}; got {value!r}")
    return float(value)


def int_pair(name: str, value, least: int) -> tuple[int, int] | None:
    """None, or a pair of ints >= ``least`` (micro-conditioning sizes and crop offsets)."""
    if value is None:
        return None
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least
                             for v in pair):
        raise ValueError(f"{name} must be a pair of integers >= {least}; got {value!r}")
    return int(pair[0]), int(pair[1])


def check_size_conditioning(**pairs) -> None:
    """``original_size=...``, ``crops_coords_top_left=...``: sizes are pairs of ints >= 1, crop offsets
    (names containing "crops") pairs of ints >= 0."""
    for name, value in pairs.items():
        int_pair(name, value, 0 if "crops" in name else 1)


def check_clip_skip(clip_skip, text_encoders) -> None:
    """``clip_skip`` skips that many of the last layers of the text encoders, so it must leave one."""
    if clip_skip is None:
        return
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) or clip_skip < 0:
        raise ValueError(f"clip_skip must be a non-negative integer or None; got {clip_skip!r}")
    layers = [encoder.config.num_hidden_layers for encoder in text_encoders if encoder is not None]
    if layers and clip_skip >= min(layers):
        raise ValueError(f"clip_skip must be smaller than the text encoders' {min(layers)} layers; got {clip_skip}")


def check_denoising_end(denoising_end) -> float | None:
    """None, or the fraction in (0, 1] of the noise levels the call denoises (1: all of them)."""
    if denoising_end is None:
        return None
    if isinstance(denoising_end, bool) or not isinstance(denoising_end, numbers.Real) or not 0 < denoising_end <= 1:
        raise ValueError(f"denoising_end must be a number in (0, 1]; got {denoising_end!r}")
    return float(denoising_end)


def check_custom_schedule(scheduler, timesteps, sigmas, stage_steps) -> dict:
    """The keyword arguments (``timesteps=`` or ``sigmas=``, or none) that set the scheduler's schedule.

    Follows diffusers' ``retrieve_timesteps``: one of the two at most, and only with a scheduler whose
    ``set_timesteps`` takes it. ``stage_steps`` chooses each stage's own schedule, so it cannot be
    combined with a given one.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either timesteps or sigmas, not both")
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if values is None:
        return {}
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                         for v in values):
        raise ValueError(f"{name} must be a non-empty list of finite numbers; got {values!r}")
    if name not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"{type(scheduler).__name__}.set_timesteps does not take custom {name}; "
                         "use a scheduler that does (e.g. EulerDiscreteScheduler)")
    if stage_steps is not None:
        raise ValueError(f"stage_steps cannot be combined with {name}: the given schedule sets every stage's "
                         "steps (upscale stages run its tail)")
    return {name: values}


def check_generator(generator, batch: int) -> None:
    """A list of generators must have one generator per image of the batch."""
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators but the call makes {batch} "
                         "image(s) (batch size x num_images_per_prompt)")


def check_memory_budget(memory_budget) -> None:
    if memory_budget is not None:
        positive_int("memory_budget", memory_budget)


def check_ip_adapter(unet, image_encoder, ip_adapter_image, ip_adapter_image_embeds) -> None:
    """IP-Adapter inputs need an IP-Adapter loaded into the UNet (``pipe.load_ip_adapter``); images
    need the image encoder too, and one image (or list of images) per loaded adapter."""
    if ip_adapter_image is None and ip_adapter_image_embeds is None:
        return
    projection = getattr(unet, "encoder_hid_proj", None)
    layers = getattr(projection, "image_projection_layers", None)
    if layers is None:
        given = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
        raise ValueError(f"{given} needs an IP-Adapter in the UNet; load one with pipe.load_ip_adapter(...)")
    if ip_adapter_image is not None:
        if image_encoder is None:
            raise ValueError("ip_adapter_image needs the pipeline's image_encoder (pipe.load_ip_adapter loads "
                             "it unless image_encoder_folder=None); or pass ip_adapter_image_embeds")
        images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
        if len(images) != len(layers):
            raise ValueError(f"ip_adapter_image has {len(images)} entries but {len(layers)} IP-Adapter(s) are "
                             "loaded: pass one image (or list of images) per adapter")
    else:
        if len(ip_adapter_image_embeds) != len(layers):
            raise ValueError(f"ip_adapter_image_embeds has {len(ip_adapter_image_embeds)} tensors but "
                             f"{len(layers)} IP-Adapter(s) are loaded")


def check_ip_adapter_masks(cross_attention_kwargs, tiled_stages: list[int]) -> None:
    """IP-Adapter masks (``cross_attention_kwargs["ip_adapter_masks"]``) cover the whole image; a UNet
    tile would get the whole mask squeezed onto it, so masks are refused for plans with tiled stages."""
    if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
        raise ValueError(f"cross_attention_kwargs must be a dict or None; got {type(cross_attention_kwargs).__name__}")
    if (cross_attention_kwargs or {}).get("ip_adapter_masks") is not None and tiled_stages:
        raise ValueError(f"ip_adapter_masks cover the whole image but stage(s) {tiled_stages} run the UNet in "
                         "tiles; pass a larger memory_budget or a smaller size so every stage runs whole")
