"""Without an adapter and at or below the base size, GSPNStableDiffusionXLPipeline gives what
StableDiffusionXLPipeline gives, argument for argument: both built from the same tiny components, same seed."""

import inspect

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import IPAdapterMaskProcessor

from gspn_diffusers import GSPNAdapter
from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline
from gspn_diffusers.processor import GSPN2AttnProcessor
from gspn_diffusers.testing import random_sdxl_components, tiny_image_encoder, tiny_ip_adapter

PROMPT = "a lighthouse at dawn"


def _pipelines(**extra):
    components = {**random_sdxl_components("tiny", "cpu", torch.float32), **extra}
    pipes = StableDiffusionXLPipeline(**components), GSPNStableDiffusionXLPipeline(**components)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def pipes():
    return _pipelines()


@pytest.fixture(scope="module")
def ip_pipes():
    encoder, processor = tiny_image_encoder()
    sdxl, gspn = _pipelines(image_encoder=encoder, feature_extractor=processor)
    gspn.load_ip_adapter(tiny_ip_adapter(gspn.unet), subfolder=None, weight_name=None, image_encoder_folder=None)
    return sdxl, gspn


def _both(pipes, **kwargs):
    kwargs = {"prompt": PROMPT, "height": 128, "width": 128, "num_inference_steps": 2, "output_type": "pt",
              **kwargs}
    sdxl, gspn = pipes
    return [pipe(generator=torch.Generator().manual_seed(0), **kwargs).images for pipe in (sdxl, gspn)]


def _assert_same(pair):
    expected, actual = pair
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_every_argument_of_the_sdxl_pipeline_is_known():
    ours = inspect.signature(GSPNStableDiffusionXLPipeline.__call__).parameters
    theirs = [name for name, p in inspect.signature(StableDiffusionXLPipeline.__call__).parameters.items()
              if name != "self" and p.kind is not p.VAR_KEYWORD]
    assert [name for name in theirs if name not in ours] == []
    # and in the same order, so positional calls mean the same
    assert [name for name in ours if name in theirs] == theirs


def test_a_call_with_every_sdxl_argument_at_its_default_runs(pipes):
    sdxl, gspn = pipes
    kwargs = {name: p.default for name, p in inspect.signature(StableDiffusionXLPipeline.__call__).parameters.items()
              if name != "self" and p.kind is not p.VAR_KEYWORD}
    kwargs.update(prompt=PROMPT, height=128, width=128, num_inference_steps=1, output_type="latent")
    expected = sdxl(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    actual = gspn(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).images
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_default_call(pipes):
    _assert_same(_both(pipes, height=None, width=None))


def test_batch_negative_prompt_guidance_rescale_and_clip_skip(pipes):
    _assert_same(_both(pipes, prompt=[PROMPT, "a red barn"], negative_prompt=["fog", "snow"],
                       num_images_per_prompt=2, guidance_rescale=0.7, clip_skip=1, output_type="latent"))


def test_custom_timesteps(pipes):
    _assert_same(_both(pipes, timesteps=[999, 730, 443, 193, 53], output_type="latent"))


def test_custom_sigmas(pipes):
    _assert_same(_both(pipes, sigmas=[14.6, 4.0, 1.0, 0.2, 0.0], output_type="latent"))


def test_denoising_end_then_a_refiner_with_denoising_start(pipes):
    """The mixture of denoisers: base to 60% of the noise levels, then an img2img refiner from there."""
    noisy = _both(pipes, num_inference_steps=5, denoising_end=0.6, output_type="latent")
    _assert_same(noisy)
    full = _both(pipes, num_inference_steps=5, output_type="latent")[1]
    assert not torch.allclose(noisy[1], full)  # the cut leaves noise in
    refiner = StableDiffusionXLImg2ImgPipeline(**pipes[0].components, requires_aesthetics_score=False)
    refiner.set_progress_bar_config(disable=True)
    refined = [refiner(PROMPT, image=latents, num_inference_steps=5, denoising_start=0.6, output_type="pt",
                       generator=torch.Generator().manual_seed(1)).images for latents in noisy]
    _assert_same(refined)


def test_negative_size_conditioning(pipes):
    negative = dict(negative_original_size=(64, 64), negative_crops_coords_top_left=(16, 8),
                    negative_target_size=(96, 128))
    pair = _both(pipes, output_type="latent", **negative)
    _assert_same(pair)
    assert not torch.allclose(pair[1], _both(pipes, output_type="latent")[1])  # it does condition


def test_positive_size_conditioning(pipes):
    _assert_same(_both(pipes, original_size=(512, 256), crops_coords_top_left=(4, 12), target_size=(128, 96),
                       output_type="latent"))


def test_ip_adapter_image(ip_pipes):
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8))
    pair = _both(ip_pipes, ip_adapter_image=image)
    _assert_same(pair)


def test_ip_adapter_image_embeds_with_a_mask(ip_pipes):
    sdxl, _ = ip_pipes
    embeds = torch.randn(2, 1, sdxl.image_encoder.config.projection_dim, generator=torch.Generator().manual_seed(3))
    mask = PIL.Image.fromarray(np.tril(np.full((128, 128), 255, np.uint8)))
    masks = IPAdapterMaskProcessor().preprocess([mask], height=128, width=128)
    plain = _both(ip_pipes, ip_adapter_image_embeds=[embeds], output_type="latent")
    _assert_same(plain)
    masked = _both(ip_pipes, ip_adapter_image_embeds=[embeds], output_type="latent",
                   cross_attention_kwargs={"ip_adapter_masks": [masks]})
    _assert_same(masked)
    assert not torch.allclose(plain[1], masked[1])


def test_ip_adapter_reaches_every_stage_and_tile(ip_pipes):
    _, gspn = ip_pipes
    shape = (2, 1, gspn.image_encoder.config.projection_dim)

    def run(seed):
        embeds = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        return gspn(PROMPT, height=320, width=320, num_inference_steps=2, tile_size=128, output_type="latent",
                    generator=torch.Generator().manual_seed(0), ip_adapter_image_embeds=[embeds])

    one, other = run(3), run(4)
    assert len(one.plan.stages) == 2 and all(stage.num_tiles > 1 for stage in one.plan.stages)
    assert torch.isfinite(one.images).all()
    assert not torch.allclose(one.images, other.images)


def test_loading_an_ip_adapter_keeps_gspn_mounted():
    _, gspn = _pipelines()
    adapter = GSPNAdapter.for_unet(gspn.unet)
    gspn.register_modules(gspn=adapter)
    adapter.mount(gspn.unet)
    mounted = {k: p for k, p in gspn.unet.attn_processors.items() if isinstance(p, GSPN2AttnProcessor)}
    assert mounted

    gspn.load_ip_adapter(tiny_ip_adapter(gspn.unet), subfolder=None, weight_name=None, image_encoder_folder=None)
    processors = gspn.unet.attn_processors
    assert all(processors[k] is p for k, p in mounted.items())
    assert all("IPAdapter" in type(p).__name__ for k, p in processors.items() if k.endswith("attn2.processor"))

    gspn.unload_ip_adapter()
    processors = gspn.unet.attn_processors
    assert all(processors[k] is p for k, p in mounted.items())
    assert not any("IPAdapter" in type(p).__name__ for p in processors.values())
    adapter.unmount(gspn.unet)
    assert not any(isinstance(p, GSPN2AttnProcessor) for p in gspn.unet.attn_processors.values())
