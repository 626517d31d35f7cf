"""vae_tiling.TUNING: every setting computes what the default computes (float32: to 1e-5 of the output's
range; bfloat16: within its rounding), keeps the memory format it promises, and leaves the VAE as it found
it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from gspn_diffusers.pipelines import vae_tiling
from gspn_diffusers.pipelines.planning import vae_grid
from gspn_diffusers.pipelines.vae_tiling import Tuning, WholeImageContext, decode_tiled, encode_tiled
from gspn_diffusers.testing import tiny_vae_config

LATENT = 32  # 256 x 256 pixels; tiles of 16 latent pixels: 3 x 3 tiles
TILE = 16
# The tiny VAE's outputs reach ~3; float32 in another summation order (the default itself is ~1e-5 from
# a float64 decode) differs by up to ~2e-5.
CODER_TOLERANCE = dict(atol=3e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_vae_config()).eval()
    with torch.no_grad():  # GroupNorm affine maps away from (1, 0), so that they are exercised
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return vae


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(1)
    z = F.interpolate(torch.randn(1, 4, LATENT // 4, LATENT // 4, generator=g), size=(LATENT, LATENT), mode="bicubic")
    return z + torch.linspace(-1, 1, LATENT).view(1, 1, 1, -1)


@pytest.fixture(scope="module")
def default_decode(vae, latents):
    """The tiled decode with every tuning off (context at half size)."""
    tuning, vae_tiling.TUNING = vae_tiling.TUNING, Tuning()
    try:
        with torch.no_grad():
            return decode_tiled(vae, latents, vae_grid(LATENT, LATENT, TILE), context_size=LATENT // 2)
    finally:
        vae_tiling.TUNING = tuning


@pytest.fixture
def tuning(monkeypatch):
    def set_tuning(**settings):
        monkeypatch.setattr(vae_tiling, "TUNING", Tuning(**settings))

    return set_tuning


def _norm(channels=32, groups=8, seed=0):
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    return norm


def _recorded(norm, x, key=0):
    whole = WholeImageContext(torch.nn.Identity())
    whole.record_statistics(key, norm, x)
    return whole


@pytest.mark.parametrize("shape", [(2, 32, 7, 9), (2, 32, 40)])
def test_affine_normalise_is_group_norm_with_the_recorded_statistics(tuning, shape):
    norm = _norm()
    x = torch.randn(*shape) * 3 + 2
    whole = _recorded(norm, x)
    tuning(affine_norm=False)
    four_passes = whole.normalise(0, norm, x)
    tuning(affine_norm=True)
    one_pass = whole.normalise(0, norm, x)
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(four_passes, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_pass, expected, atol=1e-5, rtol=1e-5)


def test_affine_normalise_uses_the_context_statistics_not_the_input(tuning):
    norm = _norm()
    context, x = torch.randn(1, 32, 8, 8) * 2 - 1, torch.randn(1, 32, 5, 6)
    whole = _recorded(norm, context)
    mean = context.reshape(1, 8, -1).mean(2).repeat_interleave(4, 1).view(1, 32, 1, 1)
    std = (context.reshape(1, 8, -1).var(2, correction=0) + norm.eps).sqrt().repeat_interleave(4, 1).view(1, 32, 1, 1)
    expected = (x - mean) / std * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    tuning(affine_norm=True)
    torch.testing.assert_close(whole.normalise(0, norm, x), expected.detach(), atol=1e-5, rtol=1e-5)


def test_affine_follows_statistics_replaced_as_share_context_does(tuning):
    """The per-tile scale and shift are kept, but made again when the statistics are new tensors."""
    norm = _norm()
    x, other = torch.randn(1, 32, 6, 6), torch.randn(1, 32, 6, 6) * 3 + 1
    whole = _recorded(norm, x)
    tuning(affine_norm=True)
    torch.testing.assert_close(whole.normalise(0, norm, x), whole.normalise(0, norm, x), atol=0, rtol=0)
    whole.statistics = dict(_recorded(norm, other).statistics)
    torch.testing.assert_close(whole.normalise(0, norm, x), _recorded(norm, other).normalise(0, norm, x),
                               atol=0, rtol=0)


def test_channels_last_statistics_and_normalise_keep_the_layout(tuning):
    norm = _norm()
    x = torch.randn(2, 32, 6, 10) * 2 + 1
    x_last = x.contiguous(memory_format=torch.channels_last)
    whole, whole_last = _recorded(norm, x), _recorded(norm, x_last)
    for a, b in zip(whole.statistics[0], whole_last.statistics[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    tuning(affine_norm=True)
    y = whole_last.normalise(0, norm, x_last)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, whole.normalise(0, norm, x), atol=1e-5, rtol=1e-5)


def test_bfloat16_affine_normalise_is_as_close_to_the_truth_as_the_four_passes(tuning):
    """Both round to bfloat16 along the way; the one pass rounds fewer times, and no worse."""
    norm = _norm(channels=64, groups=16, seed=3).bfloat16()
    context = torch.randn(2, 64, 16, 16) * 4 + 3
    x = (torch.randn(2, 64, 12, 12) * 4 + 3).bfloat16()
    whole = _recorded(norm, context)
    mean, var = whole.statistics[0]
    rstd = (var + norm.eps).rsqrt()
    truth = (x.double().reshape(2, 16, -1) - mean.double()[..., None]) * rstd.double()[..., None]
    truth = truth.reshape(x.shape) * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)
    errors = {}
    for affine in (False, True):
        tuning(affine_norm=affine)
        y = whole.normalise(0, norm, x)
        assert y.dtype == torch.bfloat16
        errors[affine] = (y.double() - truth.detach()).abs()
    scale = truth.abs().max().item()
    assert errors[True].max() < scale * 2**-6
    assert errors[True].mean() <= 1.5 * errors[False].mean()


@torch.no_grad()
@pytest.mark.parametrize("settings", [dict(affine_norm=True), dict(affine_norm=True, channels_last=True),
                                      dict(context_attention="sdpa"),
                                      dict(context_attention="matmul", channels_last=True, affine_norm=True),
                                      dict(cudnn_benchmark=True)])
def test_tuned_decode_equals_the_default(vae, latents, default_decode, tuning, settings):
    grid = vae_grid(LATENT, LATENT, TILE)
    assert len(grid) == 9
    expected = default_decode
    tuning(**settings)
    tuned = decode_tiled(vae, latents, grid, context_size=LATENT // 2)
    assert tuned.shape == expected.shape == (1, 3, LATENT * 8, LATENT * 8)
    torch.testing.assert_close(tuned, expected, **CODER_TOLERANCE)


@torch.no_grad()
def test_channels_last_untiled_decode_and_tiled_encode_equal_the_default(vae, latents, tuning):
    image = vae.decode(latents).sample.clamp(-1, 1)
    grid = vae_grid(LATENT, LATENT, TILE)
    tuning()
    expected = decode_tiled(vae, latents, None, LATENT), encode_tiled(vae, image, grid, LATENT)
    tuning(channels_last=True, affine_norm=True, context_attention="matmul")
    tuned = decode_tiled(vae, latents, None, LATENT), encode_tiled(vae, image, grid, LATENT)
    assert tuned[0].is_contiguous()
    for a, b in zip(tuned, expected):
        torch.testing.assert_close(a, b, **CODER_TOLERANCE)


def test_matmul_attention_in_chunks_is_softmax_attention(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (50, 70, 70))
    monkeypatch.setattr(vae_tiling, "SCORE_ELEMENTS", 6 * 70 * 8)  # 8 queries at a time: 7 chunks
    out = vae_tiling._matmul_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=1.0), atol=1e-5, rtol=1e-5)


def test_bfloat16_matmul_attention_keeps_float32_scores():
    """Scores rounded to bfloat16 before the softmax would be off by ~|score| 2^-9; these are not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 64, generator=g) for n in (32, 256, 256))
    q = q * 4  # scores of a few units: bfloat16 steps of ~1e-2
    truth = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    out = vae_tiling._matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    rounded_inputs = torch.softmax(q.bfloat16().double() @ k.bfloat16().double().transpose(-1, -2), -1)
    rounded_inputs = rounded_inputs @ v.bfloat16().double()
    # what is left beyond the inputs' own rounding: the weights' and the output's rounding to bfloat16
    assert (out.double() - rounded_inputs).abs().max() < 2e-2
    assert (out.double() - truth).abs().mean() < 2 * (rounded_inputs - truth).abs().mean() + 4e-3


def test_tuned_leaves_the_weights_and_flags_as_they_were(vae, latents, tuning):
    weights = {name: (p.data_ptr(), p.stride()) for name, p in vae.named_parameters()}
    benchmark = torch.backends.cudnn.benchmark
    tuning(channels_last=True, affine_norm=True, cudnn_benchmark=True)
    with pytest.raises(RuntimeError, match="boom"):
        with vae_tiling._tuned([vae.decoder]):
            assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            assert torch.backends.cudnn.benchmark
            raise RuntimeError("boom")
    assert {name: (p.data_ptr(), p.stride()) for name, p in vae.named_parameters()} == weights
    assert torch.backends.cudnn.benchmark == benchmark


def test_tuning_rejects_an_unknown_attention_and_channels_last_alone():
    with pytest.raises(ValueError, match="context_attention"):
        Tuning(context_attention="flash")
    with pytest.raises(ValueError, match="affine_norm"):
        Tuning(channels_last=True)


def _on(device, vae, dtype=torch.float32):
    moved = copy.deepcopy(vae)
    torch.nn.Module.to(moved, device=device, dtype=dtype)
    return moved


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_channels_last_reaches_every_convolution(vae, latents, tuning, device):
    """No op on the way of a tiled decode (upsampling, attention, residual adds, the norms) falls back to NCHW."""
    moved = _on(device, vae)
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous(
        memory_format=torch.channels_last))) for m in moved.modules() if isinstance(m, torch.nn.Conv2d)]
    tuning(channels_last=True, affine_norm=True, context_attention="matmul")
    decode_tiled(moved, latents.to(device), vae_grid(LATENT, LATENT, TILE), LATENT // 2)
    decode_tiled(moved, latents.to(device), None, LATENT)
    for hook in hooks:
        hook.remove()
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in moved.decoder.modules()) + 1  # + post_quant_conv
    tiled, whole = layouts[:convolutions * (1 + 9)], layouts[convolutions * (1 + 9):]
    assert len(tiled) == convolutions * (1 + 9) and all(tiled)
    assert len(whole) == convolutions and not any(whole)  # an untiled decode is the VAE's own, untuned


@torch.no_grad()
@pytest.mark.cuda
@pytest.mark.parametrize("settings", [dict(affine_norm=True), dict(affine_norm=True, channels_last=True),
                                      dict(affine_norm=True, channels_last=True, cudnn_benchmark=True,
                                           context_attention="matmul"), dict(context_attention="sdpa")])
def test_bfloat16_tuned_decode_on_cuda_is_within_the_default_rounding(vae, latents, tuning, settings):
    """Against the float32 decode, a tuned bfloat16 decode is as close as the default bfloat16 one."""
    grid = vae_grid(LATENT, LATENT, TILE)
    z = latents.cuda()
    tuning()
    exact = decode_tiled(_on("cuda", vae), z, grid, LATENT // 2)
    half = _on("cuda", vae, torch.bfloat16)
    default = decode_tiled(half, z.bfloat16(), grid, LATENT // 2)
    tuning(**settings)
    tuned = decode_tiled(half, z.bfloat16(), grid, LATENT // 2)
    rounding = (default - exact).abs()
    assert (tuned - exact).abs().mean() < 1.5 * rounding.mean()
    assert (tuned - exact).abs().max() < 2 * rounding.max()
