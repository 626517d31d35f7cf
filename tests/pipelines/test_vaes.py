"""VAEs that are not AutoencoderKL (AutoencoderTiny, ConsistencyDecoderVAE) decode with their own methods,
tile their own way when the plan needs VAE tiles, or are refused before any work naming their class."""

import pytest
import torch
from diffusers import AutoencoderTiny, ConsistencyDecoderVAE, StableDiffusionXLPipeline

from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline
from gspn_diffusers.testing import random_sdxl_components

PROMPT = "a lighthouse at dawn"


def tiny_autoencoder_tiny():
    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)


def tiny_consistency_decoder():
    torch.manual_seed(0)
    return ConsistencyDecoderVAE(
        encoder_block_out_channels=(8, 16, 16, 16), encoder_norm_num_groups=8, encoder_layers_per_block=1,
        decoder_block_out_channels=(8, 16, 16, 16), decoder_norm_num_groups=8, decoder_layers_per_block=1,
        sample_size=32)


def _pipelines(vae):
    components = {**random_sdxl_components("tiny", "cpu", torch.float32), "vae": vae}
    pipes = StableDiffusionXLPipeline(**components), GSPNStableDiffusionXLPipeline(**components)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def tiny_vae_pipes():
    return _pipelines(tiny_autoencoder_tiny())


@pytest.fixture(scope="module")
def consistency_pipes():
    return _pipelines(tiny_consistency_decoder())


def _images(pipe, **kwargs):
    torch.manual_seed(0)  # the consistency decoder draws its noise from the global generator
    kwargs = {"height": 128, "width": 128, "num_inference_steps": 2, "output_type": "pt", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("which", ["tiny_vae_pipes", "consistency_pipes"])
def test_decodes_as_the_sdxl_pipeline_does(request, which):
    sdxl, gspn = request.getfixturevalue(which)
    expected, actual = _images(sdxl), _images(gspn)
    assert actual.shape == (1, 3, 128, 128)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_tiny_vae_tiles_its_own_way_when_the_plan_needs_tiles(tiny_vae_pipes, monkeypatch):
    _, gspn = tiny_vae_pipes
    vae = gspn.vae
    seen = []
    original = AutoencoderTiny.decode

    def decode(self, *args, **kwargs):
        seen.append(self.use_tiling)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderTiny, "decode", decode)
    out = gspn(PROMPT, height=512, width=512, num_inference_steps=2, vae_tile_size=128, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.plan.decode.num_tiles > 1 and seen == [True]
    assert not vae.use_tiling  # switched back off after the decode
    assert out.images.shape == (1, 3, 512, 512) and torch.isfinite(out.images).all()


def test_tiny_vae_upsamples_in_pixels(tiny_vae_pipes):
    _, gspn = tiny_vae_pipes
    out = gspn(PROMPT, height=384, width=384, num_inference_steps=2, upsample_mode="pixel", output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert len(out.plan.stages) == 2
    assert out.images.shape == (1, 3, 384, 384) and torch.isfinite(out.images).all()


def test_consistency_decoder_is_refused_before_any_work_when_the_plan_needs_tiles(consistency_pipes, monkeypatch):
    _, gspn = consistency_pipes

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the VAE was checked")

    monkeypatch.setattr(gspn, "encode_prompt", no_work)
    monkeypatch.setattr(gspn, "_run_stage", no_work)
    with pytest.raises(ValueError, match=r"the VAE \(ConsistencyDecoderVAE\) cannot decode in tiles"):
        gspn(PROMPT, height=512, width=512, vae_tile_size=128)
    with pytest.raises(AssertionError, match="work started"):  # latents only: no decode, nothing to refuse
        gspn(PROMPT, height=512, width=512, vae_tile_size=128, output_type="latent")
