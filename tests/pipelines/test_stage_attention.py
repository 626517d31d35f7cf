"""Attention per stage: the UNet's own softmax in the base stage, the mounted GSPN adapter above, or what
``stage_attention`` asks for; the adapter is mounted (and fused) again after every call, also one that raises."""

import numpy as np
import pytest
import torch

from gspn_diffusers import GSPNAdapter, GSPNStableDiffusionXLPipeline
from gspn_diffusers.processor import GSPN2AttnProcessor

PROMPT = "a lighthouse at dawn"


def _load(path, **kwargs):
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)


def _runs_gspn(pipe) -> bool:
    return any(isinstance(p, GSPN2AttnProcessor) for p in pipe.unet.attn_processors.values())


@pytest.fixture(scope="module")
def stock(tiny_sdxl_path):
    return _load(tiny_sdxl_path)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path, stock):
    torch.manual_seed(0)
    adapter = GSPNAdapter.for_unet(stock.unet)
    with torch.no_grad():  # away from the teacher-initialised head, so that GSPN changes the image
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = _load(tiny_sdxl_path, gspn=adapter)
    yield pipe
    adapter.unmount(pipe.unet)


def _assert_mounted_as_loaded(pipe, processors):
    assert pipe.gspn.is_mounted_on(pipe.unet)
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())
    assert all(p.projections_fused for p in pipe.gspn.processors)


def test_auto_at_the_base_size_is_the_softmax_unet_exactly(pipe, stock):
    mounted = dict(pipe.unet.attn_processors)
    plain = _generate(stock)
    auto = _generate(pipe)
    assert [t["attention"] for t in auto.timings[:-1]] == ["softmax"]
    assert np.array_equal(auto.images, plain.images)
    _assert_mounted_as_loaded(pipe, mounted)

    gspn = _generate(pipe, stage_attention="gspn")
    assert [t["attention"] for t in gspn.timings[:-1]] == ["gspn"]
    assert not np.allclose(gspn.images, plain.images, atol=1e-3)
    _assert_mounted_as_loaded(pipe, mounted)


def test_a_progressive_call_runs_softmax_in_the_base_stage_and_gspn_above(pipe, stock):
    seen, base_latents = [], {}

    def record(p, step, timestep, kwargs):
        seen.append((p.stage_index, _runs_gspn(p)))
        if p.stage_index == 0:
            base_latents[p] = kwargs["latents"].clone()
        return kwargs

    out = _generate(pipe, height=512, width=384, output_type="latent", callback_on_step_end=record)
    assert [s.attention for s in out.plan.stages] == ["softmax", "gspn"]
    assert [t["attention"] for t in out.timings] == ["softmax", "gspn"]
    assert seen == [(0, False), (0, False), (1, True)]
    assert "softmax" in str(out.plan) and "gspn" in str(out.plan)

    plain = _generate(stock, height=512, width=384, output_type="latent", callback_on_step_end=record)
    assert torch.equal(base_latents[pipe], base_latents[stock])  # the base stage is the teacher's
    assert not torch.allclose(out.images, plain.images, atol=1e-3)
    # softmax for every stage: the stock pipeline's whole call
    softmax = _generate(pipe, height=512, width=384, output_type="latent", stage_attention="softmax")
    assert [t["attention"] for t in softmax.timings] == ["softmax", "softmax"]
    assert torch.equal(softmax.images, plain.images)


def test_the_adapter_is_mounted_again_after_a_stage_raises(pipe):
    mounted = dict(pipe.unet.attn_processors)
    before = _generate(pipe, height=512, width=384, output_type="latent").images

    def fail_in(stage_index):
        def callback(p, step, timestep, kwargs):
            if p.stage_index == stage_index:
                raise KeyboardInterrupt(f"stage {stage_index}")
            return kwargs
        return callback

    for stage_index in (0, 1):  # a softmax stage, then a GSPN stage
        with pytest.raises(KeyboardInterrupt, match=f"stage {stage_index}"):
            _generate(pipe, height=512, width=384, callback_on_step_end=fail_in(stage_index))
        _assert_mounted_as_loaded(pipe, mounted)
    after = _generate(pipe, height=512, width=384, output_type="latent").images
    assert torch.equal(before, after)  # processors, grid hooks and fused weights all back


def test_out_of_memory_in_a_softmax_stage_replans_it_with_softmax(pipe, monkeypatch):
    mounted = dict(pipe.unet.attn_processors)
    original = GSPNStableDiffusionXLPipeline._predict_noise
    calls = []

    def failing_once(self, model_input, t, cond, stage, weights):
        calls.append((stage.index, stage.attention, _runs_gspn(self)))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, model_input, t, cond, stage, weights)

    monkeypatch.setattr(GSPNStableDiffusionXLPipeline, "_predict_noise", failing_once)
    out = _generate(pipe, height=512, width=384, output_type="latent")
    assert out.timings[0]["attempts"] == 2 and out.timings[0]["attention"] == "softmax"
    assert calls == [(0, "softmax", False)] * 3 + [(1, "gspn", True)]
    _assert_mounted_as_loaded(pipe, mounted)


def test_stage_attention_is_checked_before_any_work(pipe, stock, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    for p in (pipe, stock):
        monkeypatch.setattr(p, "encode_prompt", no_work)
        monkeypatch.setattr(p, "_run_stage", no_work)
    with pytest.raises(ValueError, match="stage_attention has 1 values but this size has 2 stage"):
        pipe(PROMPT, height=512, width=384, stage_attention=["softmax"])
    with pytest.raises(ValueError, match="stage_attention must be"):
        pipe(PROMPT, stage_attention="auto")
    with pytest.raises(ValueError, match="no GSPN adapter"):
        stock(PROMPT, stage_attention="gspn")
    assert [s.attention for s in stock.plan(height=512, width=384).stages] == ["softmax", "softmax"]
    assert [s.attention for s in pipe.plan(height=512, width=384, stage_attention=["gspn", "softmax"]).stages] == [
        "gspn", "softmax"]
