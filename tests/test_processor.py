"""GSPN2AttnProcessor on single Attention layers (CPU, reference backend)."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from gspn_diffusers import GSPN2AttnProcessor
from gspn_diffusers.processor import scan_counts

WIDTH = 64


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=WIDTH, heads=4, dim_head=WIDTH // 4).eval()


def test_scan_counts_follow_the_direction_table():
    # H=3, W=4, chunk 3: t = w, W-1-w, h, H-1-h; n = t mod 3 + 1.
    counts = scan_counts(3, 4, chunk_size=3)
    assert counts[0, 1].tolist() == [1, 2, 3, 1]
    assert counts[1, 1].tolist() == [1, 3, 2, 1]
    assert counts[2, :, 2].tolist() == [1, 2, 3]
    assert counts[3, :, 2].tolist() == [3, 2, 1]
    assert counts[0].eq(counts[0, :1]).all() and counts[2].eq(counts[2, :, :1]).all()
    assert scan_counts(3, 4, chunk_size=None)[0, 0].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_constant_tokens_give_outputs_that_do_not_grow_with_the_scan_length(chunk_size):
    torch.manual_seed(1)
    processor = GSPN2AttnProcessor(WIDTH, 8, gate_groups=2, chunk_size=chunk_size)
    with torch.no_grad():  # arbitrary gates; lam and u stay at their constant biases (lam = 1)
        processor.coefficients.weight[: processor._num_gate_channels()].normal_()
    token = torch.randn(1, 1, WIDTH)
    expected = processor.up(processor.down(token))  # every direction's running mean of a constant
    for height in (4, 40):
        tokens = token.expand(1, height * 6, WIDTH)
        with torch.no_grad():
            out = processor.mix(tokens, (height, 6))
        torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-5, atol=1e-5)


def test_from_attention_is_the_best_rank_cp_value_path_as_to_out_sees_it(attn):
    processor = GSPN2AttnProcessor.from_attention(attn, proxy_ratio=8)
    assert processor.proxy_dim == WIDTH // 8
    out_weight, value = attn.to_out[0].weight, attn.to_v.weight
    product = processor.up.weight @ processor.down.weight
    target = out_weight @ value
    singular = torch.linalg.svdvals(target)
    # Eckart-Young: the rank-r error of W_out @ up @ down against W_out @ W_v is the energy of the dropped
    # singular values of W_out @ W_v, less than truncating W_v alone gives.
    error = torch.linalg.matrix_norm(target - out_weight @ product).square()
    torch.testing.assert_close(error, singular[8:].square().sum(), rtol=1e-4, atol=1e-5)
    left, values, right_t = torch.linalg.svd(value)
    value_only = out_weight @ (left[:, :8] * values[:8]) @ right_t[:8]
    assert error < 0.95 * torch.linalg.matrix_norm(target - value_only).square()
    assert torch.linalg.matrix_rank(product) == 8
    torch.testing.assert_close(processor.up.bias, attn.to_v.bias if attn.to_v.bias is not None
                               else torch.zeros(WIDTH))


def test_from_attention_at_full_rank_is_the_value_projection(attn):
    processor = GSPN2AttnProcessor.from_attention(attn, proxy_ratio=1)
    torch.testing.assert_close(processor.up.weight @ processor.down.weight, attn.to_v.weight, rtol=1e-4, atol=1e-5)


def test_from_attention_of_a_rank_deficient_layer_is_finite():
    torch.manual_seed(3)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    with torch.no_grad():
        attn.to_out[0].weight[:, 4:] = 0  # W_out @ W_v has rank 4 < Cp = 8
    processor = GSPN2AttnProcessor.from_attention(attn, proxy_ratio=2)
    assert all(torch.isfinite(p).all() for p in processor.parameters())
    product = attn.to_out[0].weight @ processor.up.weight @ processor.down.weight
    torch.testing.assert_close(product, attn.to_out[0].weight @ attn.to_v.weight, rtol=1e-4, atol=1e-5)


def test_fresh_processor_is_a_positive_average_of_the_projected_values(attn):
    processor = GSPN2AttnProcessor.from_attention(attn)
    processor.grid = (5, 7)
    tokens = torch.randn(2, 35, WIDTH)
    with torch.no_grad():
        out = processor(attn, tokens)
        # Undo to_out and up (both injective) to recover the mixed proxy: a positive-weight average
        # of the proxy tokens stays inside their per-channel range.
        proxy = processor.down(tokens)
        mixed = processor.up.weight.pinverse() @ (
            attn.to_out[0].weight.pinverse() @ (out - attn.to_out[0].bias).transpose(1, 2)
        ).sub(processor.up.bias[:, None])
    low = proxy.min(dim=1).values[..., None] - 1e-4
    high = proxy.max(dim=1).values[..., None] + 1e-4
    assert ((mixed >= low) & (mixed <= high)).all()


def test_surroundings_match_diffusers_for_image_shaped_input():
    torch.manual_seed(2)
    attn = Attention(
        query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0
    ).eval()
    processor = GSPN2AttnProcessor.from_attention(attn, proxy_ratio=4)
    image = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        out = processor(attn, image)
        tokens = attn.group_norm(image.flatten(2)).transpose(1, 2)
        processor.grid = (3, 5)
        core = attn.to_out[0](processor.mix(tokens, (3, 5))).transpose(1, 2).reshape(image.shape)
        softmax_shape = AttnProcessor2_0()(attn, image).shape
    assert out.shape == softmax_shape == image.shape
    torch.testing.assert_close(out, (core + image) / 2.0)


def test_without_a_grid_the_call_says_how_to_mount(attn):
    processor = GSPN2AttnProcessor.from_attention(attn)
    tokens = torch.randn(1, 12, WIDTH)
    with pytest.raises(RuntimeError, match=r"GSPNAdapter\.mount\(unet\)"):
        processor(attn, tokens)
    processor.grid = (5, 5)  # 25 != 12 tokens
    with pytest.raises(RuntimeError, match="12 tokens"):
        processor(attn, tokens)
    processor.grid = (3, 4)
    assert processor(attn, tokens).shape == tokens.shape


def test_refuses_what_it_cannot_do(attn):
    processor = GSPN2AttnProcessor.from_attention(attn)
    processor.grid = (2, 2)
    tokens = torch.randn(1, 4, WIDTH)
    with pytest.raises(ValueError, match="self-attention only"):
        processor(attn, tokens, encoder_hidden_states=tokens)
    with pytest.raises(ValueError, match="mask"):
        processor(attn, tokens, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="must divide"):
        GSPN2AttnProcessor(WIDTH, 8, gate_groups=3)
    with pytest.raises(ValueError, match="chunk_size"):
        GSPN2AttnProcessor(WIDTH, 8, chunk_size=0)


def test_float32_weights_run_on_bfloat16_tokens(attn):
    processor = GSPN2AttnProcessor.from_attention(attn)
    with torch.no_grad():
        processor.coefficients.weight.normal_(std=0.1)
    tokens = torch.randn(2, 24, WIDTH)
    with torch.no_grad():
        full = processor.mix(tokens, (4, 6))
        half = processor.mix(tokens.bfloat16(), (4, 6))
    assert processor.down.weight.dtype == torch.float32 and half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
