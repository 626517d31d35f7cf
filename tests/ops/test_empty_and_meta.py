"""Empty grids, meta and fake tensors (docs/op.md, "Empty grids, meta and fake tensors")."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gspn_diffusers.ops.cuda as cuda_backend
from gspn_diffusers.ops import gspn_propagate

# (B, C, G, H, W) with a zero somewhere, and an ordinary grid.
EMPTY = [(1, 2, 1, 0, 3), (1, 2, 1, 3, 0), (2, 2, 1, 0, 0), (0, 2, 1, 3, 3), (1, 0, 1, 3, 4)]


def make(shape, dtype=torch.float32, device="cpu", with_u=True):
    b, c, g, h, w = shape
    sizes = [(b, c, h, w), (b, 4, 3, g, h, w), (b, 4, c, h, w), (b, 4, c, h, w)]
    tensors = [torch.randn(s, dtype=dtype, device=device).requires_grad_() for s in sizes]
    return tensors if with_u else tensors[:3] + [None]


def inputs_of(tensors):
    return [t for t in tensors if t is not None]


@pytest.mark.parametrize("shape", EMPTY)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("with_u", [True, False])
def test_empty_grids_give_empty_outputs_and_gradients_of_every_input(shape, chunk_size, with_u):
    tensors = make(shape, torch.float16, with_u=with_u)
    y = gspn_propagate(*tensors, chunk_size=chunk_size)
    b, c, _, h, w = shape
    assert y.shape == (b, 4, c, h, w) and y.dtype == torch.float16
    grads = torch.autograd.grad(y, inputs_of(tensors), torch.ones_like(y))
    for t, g in zip(inputs_of(tensors), grads):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert not g.any()  # where C = 0 the gates keep their planes: y depends on none of them


@pytest.mark.parametrize("shape", EMPTY + [(2, 4, 2, 3, 5)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_meta_tensors_forward_and_backward(shape, chunk_size):
    tensors = make(shape, torch.bfloat16, device="meta")
    y = gspn_propagate(*tensors, chunk_size=chunk_size)
    b, c, _, h, w = shape
    assert y.is_meta and y.shape == (b, 4, c, h, w) and y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), tensors)
    assert [(g.shape, g.dtype, g.is_meta) for g in grads] == [(t.shape, t.dtype, True) for t in tensors]


@pytest.mark.parametrize("shape", [(2, 4, 2, 3, 5), (1, 2, 1, 0, 3)])
def test_fake_tensors_forward_and_backward(shape):
    with FakeTensorMode():
        tensors = make(shape)
        y = gspn_propagate(*tensors, chunk_size=2)
        grads = torch.autograd.grad(y.sum(), tensors)
    b, c, _, h, w = shape
    assert y.shape == (b, 4, c, h, w)
    assert [g.shape for g in grads] == [t.shape for t in tensors]


def test_meta_tensors_are_still_checked():
    x, gates, lam, _ = make((1, 4, 3, 3, 5), device="meta")
    with pytest.raises(ValueError, match="G=3 must divide the channels C=4"):
        gspn_propagate(x, gates, lam)


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 9), (1, 2, 1, 0, 8), (0, 2, 1, 3, 8), (1, 0, 1, 3, 8)])
def test_registered_cuda_ops_pass_opcheck_on_meta_tensors(shape):
    # The fake implementations and the autograd registration of csrc's custom ops, without a GPU.
    x, gates, lam, u = make(shape, device="meta")
    op = torch.ops.gspn_diffusers.propagate.default
    torch.library.opcheck(op, (x, gates, lam, u, 3, True))
    torch.library.opcheck(op, (x, gates, lam, None, 1 << 30, False))  # the backward rebuilds the state


def test_dense_per_item_reads_views_in_place_and_copies_the_rest():
    coeffs = torch.randn(2, 20, 3, 5)  # gates and lam as views of one wider tensor: read in place
    view = coeffs[:, 4:12].view(2, 4, 2, 3, 5)
    assert cuda_backend._dense_per_item(view) is view
    dense = torch.randn(2, 4, 3, 5)
    assert cuda_backend._dense_per_item(dense) is dense
    single = torch.randn(4, 1, 3, 5).transpose(0, 1)  # one batch item: its own stride does not matter
    assert cuda_backend._dense_per_item(single) is single
    assert cuda_backend._dense_per_item(torch.randn(0, 4, 3, 5)).shape == (0, 4, 3, 5)
    for strided in (torch.randn(2, 4, 5, 3).transpose(-1, -2), torch.randn(4, 2, 3, 5).transpose(0, 1),
                    torch.randn(2, 4, 3, 10)[..., ::2]):
        out = cuda_backend._dense_per_item(strided)
        assert out is not strided and out[0].is_contiguous() and torch.equal(out, strided)
