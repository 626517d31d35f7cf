"""GSPNStableDiffusionXLPipeline on the tiny SDXL (base 256): stages, tiles, outputs, callbacks, refusals."""

import numpy as np
import PIL.Image
import pytest
import torch

from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline
from gspn_diffusers.pipelines.pipeline_gspn_sdxl import GSPNPipelineOutput

PROMPT = "a lighthouse at dawn"


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path):
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_base_size_comes_from_the_unet_and_vae(pipe):
    assert pipe.base_size == 256


def test_direct_generation_at_the_base_size(pipe):
    out = generate(pipe)
    assert isinstance(out, GSPNPipelineOutput)
    assert len(out.plan.stages) == 1
    image = out.images[0]
    assert image.shape == (256, 256, 3) and np.isfinite(image).all() and image.std() > 0


def test_progressive_non_square(pipe):
    out = generate(pipe, height=512, width=384)
    assert [(s.height, s.width) for s in out.plan.stages] == [(288, 224), (512, 384)]
    assert out.images.shape == (1, 512, 384, 3) and np.isfinite(out.images).all()
    assert [t["stage"] for t in out.timings] == [0, 1, "decode"]


def test_forced_tiling_keeps_the_size_and_makes_no_nan(pipe):
    out = generate(pipe, height=512, width=640, tile_size=128, vae_tile_size=128)
    assert all(s.num_tiles > 1 for s in out.plan.stages)
    assert out.plan.decode.num_tiles > 1
    assert [t["tiles"] for t in out.timings[:-1]] == [s.num_tiles for s in out.plan.stages]
    assert out.images.shape == (1, 512, 640, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0


def test_tiled_step_stays_close_to_the_whole_latent_step(pipe):
    """One step on 2 x 2 blended tiles sees less context than on the whole latent, but its update of
    the latent must stay close (weights that do not sum to one make it differ by more than 100%)."""
    whole = generate(pipe, num_inference_steps=1, output_type="latent").images
    start = torch.randn(whole.shape, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    tiled = generate(pipe, num_inference_steps=1, output_type="latent", tile_size=192)
    assert tiled.plan.stages[0].num_tiles == 4
    difference = (tiled.images - whole).abs().mean() / (whole - start).abs().mean()
    assert difference < 0.5, difference


def test_output_types(pipe):
    pil = generate(pipe, output_type="pil").images[0]
    assert isinstance(pil, PIL.Image.Image) and pil.size == (256, 256)
    pt = generate(pipe, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 256, 256)
    latent = generate(pipe, height=512, width=384, output_type="latent").images
    assert latent.shape == (1, 4, 64, 48)
    assert generate(pipe, return_dict=False)[0].shape == (1, 256, 256, 3)


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = generate(pipe, height=512, width=512).images
    b = generate(pipe, height=512, width=512).images
    c = generate(pipe, seed=1, height=512, width=512).images
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_callback_runs_once_per_step_of_every_stage(pipe):
    calls = []

    def on_step_end(p, step, timestep, kwargs):
        calls.append((p.stage_index, step, tuple(kwargs["latents"].shape)))
        return kwargs

    out = generate(pipe, height=512, width=512, num_inference_steps=4, callback_on_step_end=on_step_end)
    expected = [(s.index, i, (1, 4, s.height // 8, s.width // 8)) for s in out.plan.stages for i in range(s.steps)]
    assert calls == expected
    assert [s.steps for s in out.plan.stages] == [4, 2]


def test_callback_can_replace_the_latents(pipe):
    def zero_latents(p, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = generate(pipe, output_type="latent", callback_on_step_end=zero_latents)
    assert out.images.abs().max() == 0


def test_stage_controls_reach_the_plan(pipe):
    out = generate(pipe, height=1024, width=1024, num_inference_steps=4, strength=[0.5, 0.25],
                   upsample_guidance=0.0, output_type="latent")
    assert [(s.strength, s.steps) for s in out.plan.stages] == [(1.0, 4), (0.5, 2), (0.25, 1)]
    assert [s.upsample_guidance for s in out.plan.stages] == [0.0, 0.0, 0.0]
    out = generate(pipe, height=512, width=512, stage_steps=[1, 2], output_type="latent")
    assert [t["steps"] for t in out.timings] == [1, 2]


def test_pixel_upsampling_runs_the_vae_both_ways_in_tiles(pipe):
    out = generate(pipe, height=512, width=512, upsample_mode="pixel", vae_tile_size=128)
    assert out.images.shape == (1, 512, 512, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=250, width=256), "multiple of 8"),
        (dict(height=512, width=516), "multiple of 8"),
        (dict(height=512, width=512, memory_budget=1000), "does not fit the memory budget"),
        (dict(height=1024, width=1024, strength=[0.5]), "upscale stage"),
        (dict(upsample_mode="nearest"), "upsample_mode"),
        (dict(output_type="jpeg"), "output_type"),
    ],
)
def test_bad_input_is_refused_before_any_work(pipe, monkeypatch, kwargs, match):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    monkeypatch.setattr(pipe, "_run_stage", no_work)
    with pytest.raises(ValueError, match=match):
        pipe(PROMPT, **kwargs)


def test_plan_without_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "_run_stage", None)
    plan = pipe.plan(height=4096, width=4096, memory_budget=2**30)
    assert [s.width for s in plan.stages] == [256, 512, 1024, 2048, 4096]
    assert plan.predicted_peak_bytes > 0 and "4096x4096" in str(plan)


def test_out_of_memory_replans_the_stage_smaller_and_keeps_finished_stages(pipe, monkeypatch):
    original = GSPNStableDiffusionXLPipeline._predict_noise
    calls = []

    def failing_once(self, model_input, t, cond, stage, weights):
        calls.append((stage.index, stage.tile))
        if stage.index == 1 and stage.tile == (32, 32) and (1, (32, 32)) not in calls[:-1]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, model_input, t, cond, stage, weights)

    monkeypatch.setattr(GSPNStableDiffusionXLPipeline, "_predict_noise", failing_once)
    out = generate(pipe, height=512, width=512, num_inference_steps=4, tile_size=256)
    first, second = out.timings[0], out.timings[1]
    assert out.plan.stages[1].tile == (32, 32)
    assert first["attempts"] == 1 and second["attempts"] == 2
    assert second["tile_size"][0] < 256 and second["tiles"] > out.plan.stages[1].num_tiles
    assert [c for c in calls if c[0] == 0] == [(0, None)] * 4  # the base stage ran once
    assert out.images.shape == (1, 512, 512, 3) and np.isfinite(out.images).all()


def test_a_float16_vae_decodes_in_a_dtype_that_does_not_overflow(pipe):
    pipe.vae.to(torch.float16)
    try:
        assert pipe.vae.config.force_upcast and pipe._vae_compute_dtype() == torch.float32  # CPU: no bfloat16
        out = generate(pipe, height=512, width=512, vae_tile_size=128)
        assert np.isfinite(out.images).all() and out.images.std() > 0
        assert pipe.vae.dtype == torch.float16  # cast back after the decode
    finally:
        pipe.vae.to(torch.float32)


def test_upsample_guidance_pulls_the_stage_towards_the_upsampled_previous_latent(pipe):
    def run(guidance):
        base = {}

        def keep_base(p, step, timestep, kwargs):
            if p.stage_index == 0:
                base["latents"] = kwargs["latents"]
            return kwargs

        out = generate(pipe, height=512, width=512, num_inference_steps=8, strength=1.0,
                       upsample_guidance=guidance, output_type="latent", callback_on_step_end=keep_base)
        upsampled = torch.nn.functional.interpolate(base["latents"], size=(64, 64), mode="bicubic")
        return (out.images - upsampled).abs().mean()

    assert run(1.0) < 0.5 * run(0.0)


def test_each_stage_sets_the_schedule_once_and_runs_the_plans_own_tiles(pipe, monkeypatch):
    set_timesteps, grids = [], []
    original_set = pipe.scheduler.set_timesteps
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", lambda *a, **k: (set_timesteps.append(a), original_set(*a, **k))[1])
    original_unit = GSPNStableDiffusionXLPipeline._run_unit

    def recording(self, unit, model_input, t, cond, stage, weights, halves):
        grids.append(stage.grid)
        return original_unit(self, unit, model_input, t, cond, stage, weights, halves)

    monkeypatch.setattr(GSPNStableDiffusionXLPipeline, "_run_unit", recording)
    out = generate(pipe, height=512, width=512, tile_size=128)
    assert len(set_timesteps) == len(out.plan.stages) == 2
    assert {id(g) for g in grids} == {id(s.grid) for s in out.plan.stages}


def test_pixel_upsampling_is_planned_with_its_vae_layouts(pipe):
    plan = pipe.plan(512, 512, upsample_mode="pixel", vae_tile_size=128)
    decode, encode = plan.stages[1].upsample
    assert (decode.latent_height, encode.latent_height) == (32, 64)
    # tiles of at most 16 latent pixels, as few as cover each latent (overlap 4): 3 of 14 over 32, 5 of 16 over 64
    assert (decode.grid.tile_height, encode.grid.tile_height, plan.decode.grid.tile_height) == (14, 16, 16)
    assert (len(decode.grid), len(encode.grid)) == (9, 25)
    assert encode.num_tiles == plan.decode.num_tiles > decode.num_tiles > 1
    assert pipe.plan(512, 512).stages[1].upsample is None


def test_vae_cast_to_its_compute_dtype_without_warning_and_back(tiny_sdxl_path, caplog):
    from diffusers.utils import logging as diffusers_logging

    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float16)  # decoded in float32 on CPU: cast for the decode, then back
    diffusers_logging.enable_propagation()
    caplog.clear()  # the cast above may have warned: only the call counts
    try:
        with caplog.at_level("WARNING"):
            generate(pipe)
    finally:
        diffusers_logging.disable_propagation()
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
    assert pipe.vae.dtype == torch.float16
