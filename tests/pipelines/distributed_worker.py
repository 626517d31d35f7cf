"""Run by tests/pipelines/test_distributed.py under `accelerate launch --num_processes 2`: every process
makes the same calls; the main process saves the outputs and plans to argv[2]."""

import sys

import torch
from accelerate import PartialState

from gspn_diffusers import GSPNAdapter
from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline, distributed

# name -> call arguments: each exercises one split on 2 processes (see the test).
CASES = {
    "guidance_and_decode": dict(prompt="a lighthouse", height=512, width=512, guidance_scale=5.0,
                                upsample_mode="pixel", vae_tile_size=128, output_type="np"),
    "tiles": dict(prompt="a lighthouse", height=512, width=512, guidance_scale=1.0, output_type="latent"),
    "images": dict(prompt=["a lighthouse", "a cat"], height=256, width=256, guidance_scale=1.0,
                   output_type="latent"),
}
# name -> call arguments for the pipeline with a GSPN adapter (``with_adapter``): a softmax base stage,
# then a GSPN stage split into tiles.
GSPN_CASES = {
    "stage_attention": dict(prompt="a lighthouse", height=512, width=512, guidance_scale=1.0, output_type="latent"),
}


def with_adapter(model: str) -> GSPNStableDiffusionXLPipeline:
    """The pipeline of ``model`` with a GSPN adapter, the same in every process (seeded)."""
    torch.manual_seed(0)
    adapter = GSPNAdapter.for_unet(GSPNStableDiffusionXLPipeline.from_pretrained(model).unet)
    with torch.no_grad():  # away from the teacher-initialised head, so that GSPN changes the result
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(model, gspn=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, name, **extra):
    kwargs = {**{**CASES, **GSPN_CASES}[name], **extra}
    out = pipe(kwargs.pop("prompt"), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               memory_budget=2**30, **kwargs)
    images = out.images if torch.is_tensor(out.images) else torch.from_numpy(out.images)
    return images, out.plan


def main(model: str, output: str):
    state = PartialState()
    main_process = distributed.is_main_process()  # the rank in torch.distributed's group
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(model).to(state.device)
    results = {}
    for pipe, cases in ((pipe, CASES), (with_adapter(model).to(state.device), GSPN_CASES)):
        for name in cases:
            images, plan = run(pipe, name)
            if main_process:
                print(plan)
            results[name] = (images.cpu(), str(plan))
    if main_process:
        torch.save(results, output)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
