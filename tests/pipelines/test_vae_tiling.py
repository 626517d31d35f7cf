"""Tiled VAE decoding/encoding with whole-image context agrees with untiled, and beats diffusers' tiling."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from gspn_diffusers.pipelines.planning import vae_grid
from gspn_diffusers.pipelines.vae_tiling import WholeImageContext, decode_tiled, encode_tiled
from gspn_diffusers.testing import tiny_vae_config

LATENT = 64  # 512 x 512 pixels
TILE = 256  # pixels: 3 x 3 tiles


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(**tiny_vae_config()).eval()


@pytest.fixture(scope="module")
def latents():
    """A latent whose content differs from tile to tile: smooth noise plus ramps in mean and contrast."""
    g = torch.Generator().manual_seed(1)
    z = F.interpolate(torch.randn(1, 4, LATENT // 4, LATENT // 4, generator=g), size=(LATENT, LATENT), mode="bicubic")
    ramp = torch.linspace(-2, 2, LATENT)
    z = z + ramp.view(1, 1, 1, -1) * torch.tensor([1.0, -1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    return z * (1 + torch.linspace(0, 2, LATENT).view(1, 1, -1, 1))


def _relative_error(a, b):
    return ((a - b).abs().mean() / b.abs().mean()).item()


def _diffusers_tiled(vae, fn, x):
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE, TILE // 8
    try:
        return fn(x)
    finally:
        vae.disable_tiling()


@torch.no_grad()
def test_tiled_decode_matches_untiled_and_beats_diffusers_tiling(vae, latents):
    grid = vae_grid(LATENT, LATENT, TILE // 8)
    assert len(grid) == 9
    untiled = vae.decode(latents).sample
    ours = decode_tiled(vae, latents, grid, context_size=LATENT)
    theirs = _diffusers_tiled(vae, lambda z: vae.decode(z).sample, latents)
    assert ours.shape == untiled.shape == (1, 3, 512, 512)
    error, diffusers_error = _relative_error(ours, untiled), _relative_error(theirs, untiled)
    assert error < 0.02, error
    assert error < diffusers_error / 10, (error, diffusers_error)


@torch.no_grad()
def test_downscaled_context_still_beats_diffusers_tiling(vae, latents):
    """Images too large for a full-size context pass get one at half the size (here 32 of 64)."""
    grid = vae_grid(LATENT, LATENT, TILE // 8)
    untiled = vae.decode(latents).sample
    ours = decode_tiled(vae, latents, grid, context_size=LATENT // 2)
    theirs = _diffusers_tiled(vae, lambda z: vae.decode(z).sample, latents)
    assert _relative_error(ours, untiled) < _relative_error(theirs, untiled)


@torch.no_grad()
def test_tiled_encode_matches_untiled(vae, latents):
    image = vae.decode(latents).sample.clamp(-1, 1)
    untiled = vae.encode(image).latent_dist.mean
    ours = encode_tiled(vae, image, vae_grid(LATENT, LATENT, TILE // 8), context_size=LATENT)
    theirs = _diffusers_tiled(vae, lambda x: vae.encode(x).latent_dist.mean, image)
    assert ours.shape == untiled.shape == (1, 4, LATENT, LATENT)
    assert _relative_error(ours, untiled) < 0.02
    assert _relative_error(ours, untiled) < _relative_error(theirs, untiled) / 10


@torch.no_grad()
def test_one_tile_is_a_plain_decode(vae, latents):
    small = latents[..., :16, :24]
    assert torch.equal(decode_tiled(vae, small, None, 16), vae.decode(small).sample)


def test_context_restores_the_vae_even_after_an_error(vae, latents):
    norms = [type(m) for m in vae.decoder.modules()]
    processors = {name: type(p) for name, p in vae.attn_processors.items()}
    context = WholeImageContext(vae.decoder)
    with pytest.raises(RuntimeError, match="boom"):
        with context.installed():
            context.mode = "record"
            raise RuntimeError("boom")
    assert [type(m) for m in vae.decoder.modules()] == norms
    assert {name: type(p) for name, p in vae.attn_processors.items()} == processors
    assert context.mode is None
