"""Validation images: the student (and, once, the teacher) generate ``--validation_prompt``.

Runs on the main process only, on the shared UNet directly (never through the DDP wrapper, so no
collective is involved); the caller puts a barrier after it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gspn_diffusers.distill.student import teacher_mode


def _pipeline(components, unet):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(components.scheduler_config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, args, device) -> list:
    images = []
    for index in range(args.num_validation_images):
        generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
        images.append(pipe(
            args.validation_prompt, num_inference_steps=args.validation_inference_steps,
            height=args.resolution, width=args.resolution, generator=generator,
        ).images[0])
    return images


def log_validation(accelerator, components, adapter, args, step: int, with_teacher: bool) -> Path:
    """Save student (and teacher) images to output_dir/validation/step-N and send them to the trackers."""
    # Follows log_validation of diffusers' train_text_to_image_sdxl.py (tracker image logging).
    folder = Path(args.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    pipe = _pipeline(components, components.unet)
    sets = {}
    with torch.no_grad(), accelerator.autocast():
        sets["student"] = _generate(pipe, args, accelerator.device)
        if with_teacher:
            with teacher_mode(adapter, components.unet):
                sets["teacher"] = _generate(pipe, args, accelerator.device)
    for name, images in sets.items():
        for index, image in enumerate(images):
            image.save(folder / f"{name}-{index}.png")
    for tracker in accelerator.trackers:
        for name, images in sets.items():
            if tracker.name == "tensorboard":
                import numpy as np

                stack = np.stack([np.asarray(image) for image in images])
                tracker.writer.add_images(f"validation/{name}", stack, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({f"validation/{name}": [wandb.Image(image, caption=args.validation_prompt)
                                                   for image in images]}, step=step)
    return folder
