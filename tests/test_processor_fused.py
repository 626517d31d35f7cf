"""The processor's inference path and folded projections against its training path (CPU, reference backend)."""

import copy
import hashlib

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from gspn_diffusers import GSPN2AttnProcessor, GSPNAdapter
from gspn_diffusers.testing import TINY_TEXT_HIDDEN


def layer(width, proxy, groups, chunk, seed):
    """An Attention layer and a processor with random (not neutral) coefficients, skip and biases."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=width, heads=2, dim_head=width // 2).eval()
    processor = GSPN2AttnProcessor.from_attention(attn, proxy_ratio=width // proxy, gate_groups=groups, chunk_size=chunk)
    with torch.no_grad():
        processor.coefficients.weight.normal_(std=0.3)
        processor.coefficients.bias.normal_()
        processor.skip.normal_()
        processor.up.bias.normal_()
        attn.to_out[0].bias.normal_()
    return attn, processor


def training_path(attn, processor, tokens, grid):
    """What a training step computes: ``mix`` then the layer's own ``to_out``."""
    return attn.to_out[1](attn.to_out[0](processor.mix(tokens, grid)))


def called(attn, processor, tokens, grid, fused):
    processor.fuse_projections() if fused else processor.unfuse_projections()
    processor.grid = grid
    with torch.no_grad():
        return processor(attn, tokens)


# (width, proxy, groups, chunk, batch, grid): odd grids, batch > 1, local and global propagation.
SHAPES = [(32, 8, 2, None, 3, (5, 7)), (48, 6, 1, 3, 2, (9, 4)), (16, 16, 16, 2, 1, (3, 11))]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_inference_path_matches_the_training_path_in_float32(shape, fused):
    width, proxy, groups, chunk, batch, grid = shape
    attn, processor = layer(width, proxy, groups, chunk, seed=sum(grid))
    tokens = torch.randn(batch, grid[0] * grid[1], width)
    with torch.no_grad():
        expected = training_path(attn, processor, tokens, grid)
    got = called(attn, processor, tokens, grid, fused)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_inference_path_is_as_accurate_as_the_training_path_in_16_bit(shape, dtype, fused):
    # Both paths round differently; measured against float64, the inference path's error must stay within
    # the training path's own (plus one unit of the dtype's rounding at the output's scale).
    width, proxy, groups, chunk, batch, grid = shape
    attn, processor = layer(width, proxy, groups, chunk, seed=sum(grid) + 1)
    tokens = torch.randn(batch, grid[0] * grid[1], width)
    with torch.no_grad():
        exact = training_path(attn.double(), processor.double(), tokens.double(), grid)
        attn.to(dtype), processor.to(dtype)
        unfused_error = (training_path(attn, processor, tokens.to(dtype), grid).double() - exact).abs().max()
    got = called(attn, processor, tokens.to(dtype), grid, fused)
    assert got.dtype == dtype
    scale = exact.abs().max()
    error = (got.double() - exact).abs().max()
    assert error <= 2 * unfused_error + torch.finfo(dtype).eps * scale, (error, unfused_error, scale)


def test_float32_weights_on_16_bit_tokens_take_the_inference_path():
    attn, processor = layer(32, 8, 1, None, seed=3)
    tokens = torch.randn(2, 20, 32)
    with torch.no_grad():
        exact = training_path(attn, processor, tokens, (4, 5))
    attn.half()  # the UNet in float16, the processor kept in float32 (mount(match_dtype=False))
    got = called(attn, processor, tokens.half(), (4, 5), fused=True)
    assert got.dtype == torch.float16 and processor.up.weight.dtype == torch.float32
    torch.testing.assert_close(got.float(), exact, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_training_gradients_are_those_of_mix_then_to_out(fused):
    attn, processor = layer(32, 8, 2, 3, seed=4)
    tokens = torch.randn(2, 24, 32, requires_grad=True)
    target = torch.randn(2, 24, 32)

    def gradients(fn):
        processor.zero_grad(), attn.zero_grad()
        tokens.grad = None
        (fn() - target).square().mean().backward()
        named = [*processor.named_parameters(), *attn.to_out.named_parameters()]
        return {name: p.grad.clone() for name, p in named} | {"tokens": tokens.grad.clone()}

    expected = gradients(lambda: training_path(attn, processor, tokens, (4, 6)))
    processor.fuse_projections() if fused else processor.unfuse_projections()
    processor.grid = (4, 6)
    got = gradients(lambda: processor(attn, tokens))
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_folded_weights_follow_changes_to_up_and_to_out():
    attn, processor = layer(32, 8, 1, None, seed=5)
    tokens = torch.randn(2, 12, 32)
    called(attn, processor, tokens, (3, 4), fused=True)  # builds the folded weights
    optimizer = torch.optim.SGD([processor.up.weight, attn.to_out[0].weight, processor.down.bias], lr=0.5)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    optimizer.step()  # in-place updates, as a training step makes them
    with torch.no_grad():
        expected = training_path(attn, processor, tokens, (3, 4))
    torch.testing.assert_close(called(attn, processor, tokens, (3, 4), fused=True), expected, rtol=1e-5, atol=1e-4)

    replacement = GSPN2AttnProcessor(32, 8)  # load_state_dict copies into the parameters in place
    processor.load_state_dict(replacement.state_dict())
    with torch.no_grad():
        expected = training_path(attn, processor, tokens, (3, 4))
    torch.testing.assert_close(called(attn, processor, tokens, (3, 4), fused=True), expected, rtol=1e-5, atol=1e-4)


def test_to_out_with_a_forward_hook_is_not_folded():
    attn, processor = layer(32, 8, 1, None, seed=6)
    seen = []
    handle = attn.to_out[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        got = called(attn, processor, torch.randn(1, 6, 32), (2, 3), fused=True)
    finally:
        handle.remove()
    assert seen == [got.shape]


def file_digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_saved_adapter_is_byte_identical_after_fuse_and_unfuse(tiny_sdxl_path, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet").eval()
    adapter = GSPNAdapter.for_unet(unet)
    adapter.save_pretrained(tmp_path / "before")
    keys = set(adapter.state_dict())
    inputs = dict(
        sample=torch.randn(2, 4, 16, 16),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, 2 * TINY_TEXT_HIDDEN),
        added_cond_kwargs=dict(text_embeds=torch.randn(2, TINY_TEXT_HIDDEN), time_ids=torch.randn(2, 6)),
    )
    with adapter.mounted(unet), torch.no_grad():
        unfused = unet(**inputs).sample
        adapter.fuse_projections()
        fused = unet(**inputs).sample
        assert set(adapter.state_dict()) == keys
        adapter.save_pretrained(tmp_path / "fused")
    adapter.unfuse_projections()
    adapter.save_pretrained(tmp_path / "unfused")
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)
    before = file_digests(tmp_path / "before")
    assert file_digests(tmp_path / "fused") == before
    assert file_digests(tmp_path / "unfused") == before


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inference_path_on_cuda_matches_the_training_path(dtype, fused):
    # The CUDA kernels called without torch.library's dispatch, the GEMMs on strided and expanded operands.
    attn, processor = layer(64, 8, 1, None, seed=7)
    tokens = torch.randn(2, 12 * 20, 64)
    with torch.no_grad():  # float64 on the CPU (the kernels take 32 and 16 bits only)
        exact = training_path(copy.deepcopy(attn).double(), copy.deepcopy(processor).double(), tokens.double(), (12, 20))
        attn, processor, tokens = attn.cuda().to(dtype), processor.cuda().to(dtype), tokens.cuda().to(dtype)
        unfused_error = (training_path(attn, processor, tokens, (12, 20)).cpu().double() - exact).abs().max()
    with torch.inference_mode():
        got = called(attn, processor, tokens, (12, 20), fused).cpu()
    error = (got.double() - exact).abs().max()
    assert error <= 2 * unfused_error + torch.finfo(dtype).eps * exact.abs().max(), (error, unfused_error)
