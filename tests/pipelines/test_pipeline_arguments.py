"""Every argument of GSPNStableDiffusionXLPipeline.__call__ is checked before any work: bad values raise a
ValueError naming the argument, and nothing (prompt encoding, denoising) has started."""

import pytest
import torch
from diffusers import DDIMScheduler

from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline
from gspn_diffusers.pipelines.conditioning import Conditioning, negative_size_conditioning
from gspn_diffusers.pipelines.schedule import cut_at_denoising_end
from gspn_diffusers.testing import random_sdxl_components

PROMPT = "a lighthouse at dawn"


@pytest.fixture(scope="module")
def pipe():
    pipe = GSPNStableDiffusionXLPipeline(**random_sdxl_components("tiny", "cpu", torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def no_work(pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    for name in ("encode_prompt", "_run_stage", "prepare_ip_adapter_image_embeds", "_vae_decode"):
        monkeypatch.setattr(pipe, name, fail)
    return pipe


BAD = [
    (dict(height=0), "height must be a positive integer; got 0"),
    (dict(width=0), "width must be a positive integer; got 0"),
    (dict(height=-256), "height must be a positive integer"),
    (dict(height=256.0), "height must be a positive integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer; got 0"),
    (dict(num_images_per_prompt=-2), "num_images_per_prompt"),
    (dict(num_images_per_prompt=1.5), "num_images_per_prompt"),
    (dict(num_images_per_prompt=None), "num_images_per_prompt"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be in"),
    (dict(eta=-0.1), "eta must be in"),
    (dict(clip_skip=-1), "clip_skip must be a non-negative integer"),
    (dict(clip_skip=2), "clip_skip must be smaller than the text encoders' 2 layers"),
    (dict(memory_budget=0), "memory_budget must be a positive integer"),
    (dict(original_size=(0, 256)), "original_size must be a pair of integers >= 1"),
    (dict(target_size=(256,)), "target_size must be a pair"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left must be a pair of integers >= 0"),
    (dict(negative_original_size="big"), "negative_original_size must be a pair"),
    (dict(negative_crops_coords_top_left=(0, -8)), "negative_crops_coords_top_left"),
    (dict(negative_target_size=(256, 0)), "negative_target_size"),
    (dict(denoising_end=0.0), "denoising_end must be a number in"),
    (dict(denoising_end=1.5), "denoising_end must be a number in"),
    (dict(timesteps=[999, 500], sigmas=[1.0, 0.0]), "either timesteps or sigmas"),
    (dict(timesteps=[]), "timesteps must be a non-empty list"),
    (dict(sigmas=[1.0, float("inf")]), "sigmas must be a non-empty list of finite numbers"),
    (dict(height=512, width=512, timesteps=[999, 500, 100], stage_steps=2), "stage_steps cannot be combined"),
    (dict(height=512, width=512, denoising_end=0.1), "leaves no step to the last stage"),
    (dict(generator=[torch.Generator()] * 3, num_images_per_prompt=2), "list of 3 generators"),
    (dict(ip_adapter_image_embeds=[torch.zeros(2, 1, 16)]), "needs an IP-Adapter in the UNet"),
    (dict(cross_attention_kwargs=[("scale", 1.0)]), "cross_attention_kwargs must be a dict"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(upsample_mode="nearest"), "upsample_mode"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(height=250), "multiple of 8"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), "latents must have the base stage's shape"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(sorted(k))[1:-1] for k, _ in BAD])
def test_bad_input_is_refused_before_any_work(no_work, kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        no_work(PROMPT, **kwargs)


def test_ip_adapter_masks_are_refused_for_tiled_stages(no_work):
    masks = [torch.ones(1, 1, 512, 512)]
    with pytest.raises(ValueError, match=r"ip_adapter_masks cover the whole image but stage\(s\) \[0, 1\]"):
        no_work(PROMPT, height=512, width=512, tile_size=128, cross_attention_kwargs={"ip_adapter_masks": masks})


def test_a_scheduler_without_custom_timesteps_is_refused(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config))
    monkeypatch.setattr(pipe, "encode_prompt", None)
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps does not take custom timesteps"):
        pipe(PROMPT, timesteps=[999, 500])


def test_plan_refuses_zero_sizes_and_zero_images(pipe):
    with pytest.raises(ValueError, match="height must be a positive integer; got 0"):
        pipe.plan(height=0, width=256)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer; got 0"):
        pipe.plan(num_images_per_prompt=0)
    assert pipe.plan(height=None).height == pipe.base_size


def test_custom_timesteps_run_their_tail_in_upscale_stages(pipe):
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append((p.stage_index, int(timestep)))
        return kwargs

    out = pipe(PROMPT, height=384, width=384, timesteps=[999, 800, 600, 400, 200, 50], strength=0.5,
               output_type="latent", callback_on_step_end=record)
    assert [(s.steps, s.schedule_steps) for s in out.plan.stages] == [(6, 6), (3, 6)]
    assert seen == [(0, t) for t in (999, 800, 600, 400, 200, 50)] + [(1, t) for t in (400, 200, 50)]


def test_denoising_end_cuts_the_last_stage(pipe):
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append((p.stage_index, int(timestep)))
        return kwargs

    pipe(PROMPT, height=384, width=384, timesteps=[999, 800, 600, 400, 200, 50], strength=0.5, denoising_end=0.7,
         output_type="latent", callback_on_step_end=record)
    # cutoff 300: the base stage runs all of its schedule, the last stage stops before 200
    assert seen == [(0, t) for t in (999, 800, 600, 400, 200, 50)] + [(1, 400)]


def test_cut_at_denoising_end_follows_diffusers():
    timesteps = torch.tensor([999.0, 800.0, 600.0, 400.0, 200.0, 50.0])
    assert cut_at_denoising_end(timesteps, 0.8, 1000).tolist() == [999, 800, 600, 400, 200]
    assert cut_at_denoising_end(timesteps, 0.4, 1000).tolist() == [999, 800, 600]
    assert cut_at_denoising_end(timesteps, None, 1000) is timesteps
    assert cut_at_denoising_end(timesteps, 1.0, 1000) is timesteps


def test_negative_size_conditioning_alone_applies():
    positive = ((256, 256), (0, 0), (256, 256))
    assert negative_size_conditioning(*positive, None, (0, 0), None) is None
    assert negative_size_conditioning(*positive, (64, 64), (0, 0), None) == ((64, 64), (0, 0), (256, 256))
    assert negative_size_conditioning(*positive, None, (8, 4), None) == ((256, 256), (8, 4), (256, 256))
    assert negative_size_conditioning(*positive, (64, 64), (8, 4), (32, 32)) == ((64, 64), (8, 4), (32, 32))


def test_every_row_of_the_unconditional_half_gets_the_negative_time_ids(pipe, monkeypatch):
    captured = {}
    original = GSPNStableDiffusionXLPipeline._conditioning

    def keep(self, *args, **kwargs):
        captured["cond"] = original(self, *args, **kwargs)
        return captured["cond"]

    monkeypatch.setattr(GSPNStableDiffusionXLPipeline, "_conditioning", keep)
    pipe([PROMPT, "a barn"], height=64, width=64, num_inference_steps=1, num_images_per_prompt=2,
         negative_original_size=(32, 48), output_type="latent")
    time_ids = captured["cond"].time_ids
    assert time_ids.shape == (8, 6)
    assert time_ids[:4].tolist() == [[32, 48, 0, 0, 64, 64]] * 4
    assert time_ids[4:].tolist() == [[64, 64, 0, 0, 64, 64]] * 4


def test_conditioning_halves_carry_their_ip_adapter_rows():
    cond = Conditioning(torch.arange(4.0).view(4, 1, 1), torch.arange(4.0).view(4, 1), torch.arange(4.0).view(4, 1),
                        None, True, [torch.arange(4.0).view(4, 1, 1)])
    assert cond.batch == 2
    uncond, text = cond.half(0), cond.half(1)
    assert uncond.image_embeds[0].flatten().tolist() == [0, 1] and text.image_embeds[0].flatten().tolist() == [2, 3]
    assert text.added_cond_kwargs()["image_embeds"][0].flatten().tolist() == [2, 3]
    assert "image_embeds" not in Conditioning(cond.prompt_embeds, cond.text_embeds, cond.time_ids, None,
                                              True).added_cond_kwargs()
