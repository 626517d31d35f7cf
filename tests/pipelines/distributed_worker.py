"""Run by tests/pipelines/test_distributed.py under `accelerate launch --num_processes 2`: every process
makes the same calls; the main process saves the outputs and plans to argv[2]."""

import sys

import torch
from accelerate import PartialState

from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline, distributed

# name -> call arguments: each exercises one split on 2 processes (see the test).
CASES = {
    "guidance_and_decode": dict(prompt="a lighthouse", height=512, width=512, guidance_scale=5.0,
                                upsample_mode="pixel", vae_tile_size=128, output_type="np"),
    "tiles": dict(prompt="a lighthouse", height=512, width=512, guidance_scale=1.0, output_type="latent"),
    "images": dict(prompt=["a lighthouse", "a cat"], height=256, width=256, guidance_scale=1.0,
                   output_type="latent"),
}


def run(pipe, name, **extra):
    kwargs = {**CASES[name], **extra}
    out = pipe(kwargs.pop("prompt"), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               memory_budget=2**30, **kwargs)
    images = out.images if torch.is_tensor(out.images) else torch.from_numpy(out.images)
    return images, out.plan


def main(model: str, output: str):
    state = PartialState()
    main_process = distributed.is_main_process()  # the rank in torch.distributed's group
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(model).to(state.device)
    results = {}
    for name in CASES:
        images, plan = run(pipe, name)
        if main_process:
            print(plan)
        results[name] = (images.cpu(), str(plan))
    if main_process:
        torch.save(results, output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
