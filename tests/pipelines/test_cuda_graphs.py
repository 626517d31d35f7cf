"""CUDA-graph replay of the UNet calls: signatures, when graphs apply, and (on CUDA) graphed == eager."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from gspn_diffusers import GSPNAdapter
from gspn_diffusers.pipelines import GSPNStableDiffusionXLPipeline
from gspn_diffusers.pipelines import cuda_graphs, pipeline_gspn_sdxl
from gspn_diffusers.pipelines.cuda_graphs import (
    MAX_GRAPHED_LATENT_PIXELS,
    GraphedCalls,
    _rebuild,
    eager_reason,
    has_offload_hooks,
    signature,
)
from gspn_diffusers.testing import TINY_TEXT_HIDDEN, tiny_unet_config

PROMPT = "a lighthouse at dawn"


# ------------------------------------------------------------------------------------- signatures


def test_equal_shapes_share_a_signature_and_values_do_not_matter():
    a = dict(x=torch.zeros(2, 3), extra=dict(y=torch.zeros(4, dtype=torch.float16), z=None), n=3)
    b = dict(x=torch.ones(2, 3), extra=dict(y=torch.ones(4, dtype=torch.float16), z=None), n=3)
    key_a, tensors_a, constants_a = signature(a)
    key_b, tensors_b, _ = signature(b)
    assert key_a == key_b and hash(key_a) == hash(key_b)
    assert tensors_a[0] is a["x"] and tensors_a[1] is a["extra"]["y"] and len(tensors_b) == 2
    assert constants_a == [None, 3]


@pytest.mark.parametrize("change", [
    dict(x=torch.zeros(2, 4)),                       # shape
    dict(x=torch.zeros(2, 3, dtype=torch.float64)),  # dtype
    dict(n=4),                                       # an immutable value
    dict(n=3.0),                                     # the same number of another type
    dict(n=True),
    dict(x=[torch.zeros(2, 3)]),                     # structure
    dict(extra=None),                                # a missing argument
])
def test_any_change_but_tensor_values_makes_another_signature(change):
    base = dict(x=torch.zeros(2, 3), n=3, extra=dict(y=torch.zeros(1)))
    assert signature(base)[0] != signature({**base, **change})[0]


def test_other_objects_are_keyed_by_identity():
    module = nn.Linear(2, 2)
    twin = nn.Linear(2, 2)
    key = signature(dict(x=torch.zeros(1), m=module))[0]
    assert signature(dict(x=torch.ones(1), m=module))[0] == key
    assert signature(dict(x=torch.zeros(1), m=twin))[0] != key


def test_rebuild_gives_the_arguments_back():
    arguments = dict(sample=torch.randn(2, 4), t=torch.tensor(3.0), cond=dict(ids=torch.ones(2, 6), emb=[torch.ones(1)]),
                     scale=None, pair=(1, torch.zeros(2)))
    key, tensors, constants = signature(arguments)
    rebuilt = _rebuild(key, iter(tensors), iter(constants))
    assert rebuilt.keys() == arguments.keys() and rebuilt["scale"] is None
    assert rebuilt["cond"]["ids"] is arguments["cond"]["ids"] and rebuilt["cond"]["emb"][0] is arguments["cond"]["emb"][0]
    assert type(rebuilt["pair"]) is tuple and rebuilt["pair"][0] == 1 and rebuilt["pair"][1] is arguments["pair"][1]


def test_graphed_calls_refuse_tensors_off_cuda():
    calls = GraphedCalls(lambda x: x)
    with pytest.raises(ValueError, match="one CUDA device"):
        calls(x=torch.zeros(2))
    with pytest.raises(ValueError, match="one CUDA device"):
        calls(x=None)
    assert len(calls) == 0
    calls.release()  # nothing captured: no CUDA call


# ------------------------------------------------------------------------------- when graphs apply


@pytest.fixture
def fake_cuda():
    with FakeTensorMode():
        yield


def test_small_cuda_calls_with_a_device_timestep_are_graphed(fake_cuda):
    t = torch.tensor(999.0, device="cuda")
    assert eager_reason(torch.empty(2, 4, 128, 128, device="cuda"), t) is None
    assert eager_reason(torch.empty(2, 4, 256, 256, device="cuda"), t) is None  # 2048^2 images
    assert eager_reason(torch.empty(8, 4, 128, 512, device="cuda"), t) is None  # the batch is not counted
    assert eager_reason(torch.empty(2, 4, 128, 128, device="cuda"), t, cross_attention_kwargs={}) is None


def test_large_latents_run_eagerly(fake_cuda):
    t = torch.tensor(999.0, device="cuda")
    assert MAX_GRAPHED_LATENT_PIXELS == 256 * 256
    assert "GPU to bound" in eager_reason(torch.empty(1, 4, 256, 260, device="cuda"), t)
    assert "GPU to bound" in eager_reason(torch.empty(1, 4, 512, 512, device="cuda"), t)


@pytest.mark.parametrize("timestep", [999, 999.0, "cpu", "1-dim"])
def test_a_timestep_that_is_not_a_0_dim_device_tensor_runs_eagerly(fake_cuda, timestep):
    if timestep == "cpu":
        timestep = torch.tensor(999.0)
    elif timestep == "1-dim":
        timestep = torch.tensor([999.0], device="cuda")
    assert "timestep" in eager_reason(torch.empty(2, 4, 128, 128, device="cuda"), timestep)


def test_attention_kwargs_and_ip_adapter_embeddings_run_eagerly(fake_cuda):
    sample, t = torch.empty(2, 4, 128, 128, device="cuda"), torch.tensor(999.0, device="cuda")
    assert "cross_attention_kwargs" in eager_reason(sample, t, cross_attention_kwargs={"scale": 0.5})
    assert "IP-Adapter" in eager_reason(sample, t, image_embeds=[torch.empty(2, 1, 16, device="cuda")])


def test_cpu_calls_run_eagerly():
    assert "not a CUDA device" in eager_reason(torch.zeros(2, 4, 8, 8), torch.tensor(999.0))


def test_offload_hooks_are_found_on_any_submodule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert not has_offload_hooks(model)
    model[1][0]._hf_hook = object()
    assert has_offload_hooks(model)
    other = nn.Sequential(nn.Linear(2, 2))
    other._diffusers_hook = object()
    assert has_offload_hooks(other)


# ----------------------------------------------------------------- the pipeline's use, on the CPU


class RecordingCalls:
    """Stands in for GraphedCalls on the CPU: calls ``fn`` eagerly and records signatures and release."""

    made = []

    def __init__(self, fn):
        self.fn, self.keys, self.released = fn, [], False
        RecordingCalls.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.released = True

    def __call__(self, **arguments):
        assert not self.released
        self.keys.append(signature(arguments)[0])
        return self.fn(**arguments)


@pytest.fixture(scope="module")
def cpu_pipe(tiny_sdxl_path):
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "latent", "height": 512, "width": 384, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)


def test_the_pipeline_routes_unet_calls_through_one_graph_set_per_stage(cpu_pipe, monkeypatch):
    eager = _generate(cpu_pipe).images
    monkeypatch.setattr(RecordingCalls, "made", [])
    monkeypatch.setattr(pipeline_gspn_sdxl, "GraphedCalls", RecordingCalls)
    monkeypatch.setattr(pipeline_gspn_sdxl, "eager_reason", lambda *args, **kwargs: None)
    out = _generate(cpu_pipe)
    assert torch.equal(out.images, eager)  # the arguments reach the UNet unchanged
    made = RecordingCalls.made
    assert len(made) == len(out.plan.stages) == 2 and all(calls.released for calls in made)
    assert [len(calls.keys) for calls in made] == [s.steps for s in out.plan.stages]
    assert [len(set(calls.keys)) for calls in made] == [1, 1]  # every step of a stage: one signature
    assert cpu_pipe._graphed_unet is None


def test_graphs_can_be_turned_off(cpu_pipe, monkeypatch):
    monkeypatch.setattr(RecordingCalls, "made", [])
    monkeypatch.setattr(pipeline_gspn_sdxl, "GraphedCalls", RecordingCalls)
    monkeypatch.setattr(pipeline_gspn_sdxl, "eager_reason", lambda *args, **kwargs: None)
    assert cpu_pipe.cuda_graphs is True
    monkeypatch.setattr(cpu_pipe, "cuda_graphs", False)
    _generate(cpu_pipe, num_inference_steps=1)
    assert RecordingCalls.made == []


def test_calls_that_must_run_eagerly_do_not_reach_the_graphs(cpu_pipe, monkeypatch):
    monkeypatch.setattr(RecordingCalls, "made", [])
    monkeypatch.setattr(pipeline_gspn_sdxl, "GraphedCalls", RecordingCalls)
    _generate(cpu_pipe, num_inference_steps=1)  # the real eager_reason: CPU calls stay eager
    assert RecordingCalls.made and not any(calls.keys for calls in RecordingCalls.made)


# --------------------------------------------------------------------------------------- on CUDA


def _tiny_unet(dtype, gspn: bool, fused: bool = True):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval().requires_grad_(False)
    adapter = None
    if gspn:
        adapter = GSPNAdapter.for_unet(unet)
        with torch.no_grad():  # away from the neutral head, so that the propagation matters
            for p in adapter.parameters():
                p.add_(0.05 * torch.randn_like(p))
        adapter.mount(unet)
        if fused:
            adapter.fuse_projections()
    return unet.to("cuda", dtype), adapter


def _unet_inputs(batch, height, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def noise(*shape):
        return torch.randn(*shape, generator=g).to("cuda", dtype)

    return dict(
        sample=noise(batch, 4, height, width),
        timestep=torch.tensor(float(seed * 37 % 1000), device="cuda"),
        encoder_hidden_states=noise(batch, 77, 2 * TINY_TEXT_HIDDEN),
        added_cond_kwargs=dict(text_embeds=noise(batch, TINY_TEXT_HIDDEN), time_ids=noise(batch, 6)),
    )


def _tolerance(dtype):
    return dict(rtol=0, atol=1e-3) if dtype == torch.float16 else dict(rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gspn", [False, True], ids=["softmax", "gspn-fused"])
def test_replays_equal_eager_calls_and_a_new_shape_captures_a_new_graph(dtype, gspn):
    unet, _ = _tiny_unet(dtype, gspn)

    def forward(**kwargs):
        return unet(**kwargs, return_dict=False)[0]

    inputs = [_unet_inputs(2, 24, 40, dtype, seed) for seed in range(3)]  # a non-square token grid
    with torch.no_grad():
        expected = [forward(**x) for x in inputs]
    with GraphedCalls(forward) as graphed:
        got = [graphed(**x) for x in inputs]  # the warm-up's result, then two replays
        assert len(graphed) == 1
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **_tolerance(dtype))
        assert not torch.equal(got[1], got[2])  # the returned tensors are not the graph's static output
        other = _unet_inputs(1, 32, 32, dtype, seed=5)
        with torch.no_grad():
            want = forward(**other)
        torch.testing.assert_close(graphed(**other), want, **_tolerance(dtype))
        torch.testing.assert_close(graphed(**other), want, **_tolerance(dtype))
        assert len(graphed) == 2
        torch.testing.assert_close(graphed(**inputs[0]), expected[0], **_tolerance(dtype))  # the first graph again
    assert len(graphed) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_fused_gspn_inference_path_is_captured(dtype):
    unet, adapter = _tiny_unet(dtype, gspn=True, fused=True)
    processors = adapter.processors
    assert all(p.projections_fused for p in processors)
    called = []
    mix_inference = type(processors[0]).mix_inference

    def recording(self, *args, **kwargs):
        called.append(torch.cuda.is_current_stream_capturing())
        return mix_inference(self, *args, **kwargs)

    x, y = _unet_inputs(2, 16, 48, dtype, seed=1), _unet_inputs(2, 16, 48, dtype, seed=2)
    with torch.no_grad():
        expected = unet(**y, return_dict=False)[0]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(processors[0]), "mix_inference", recording)
        with GraphedCalls(lambda **kw: unet(**kw, return_dict=False)[0]) as graphed:
            graphed(**x)
            assert called.count(True) == len(processors)  # every layer went through the capture
            called.clear()
            got = graphed(**y)
            assert called == []  # a replay runs no Python
    tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-2)
    torch.testing.assert_close(got, expected, **tolerance)


def _cuda_pipe(tiny_sdxl_path, dtype, gspn: bool):
    adapter = None
    if gspn:
        stock = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        torch.manual_seed(0)
        adapter = GSPNAdapter.for_unet(stock.unet)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe = GSPNStableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, gspn=adapter, torch_dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def graph_sizes(monkeypatch):
    """Graphs captured per stage attempt, recorded when each set is released."""
    sizes = []
    release = GraphedCalls.release

    def recording(self):
        sizes.append(len(self))
        release(self)

    monkeypatch.setattr(GraphedCalls, "release", recording)
    return sizes


@pytest.mark.cuda
@pytest.mark.parametrize("tile_size", [None, 256], ids=["whole", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gspn", [False, True], ids=["softmax", "gspn"])
def test_the_graphed_pipeline_makes_the_eager_pipelines_latents(tiny_sdxl_path, dtype, gspn, tile_size, graph_sizes):
    pipe = _cuda_pipe(tiny_sdxl_path, dtype, gspn)
    pipe.cuda_graphs = False
    eager = _generate(pipe, tile_size=tile_size).images
    assert graph_sizes == []
    pipe.cuda_graphs = True
    out = _generate(pipe, tile_size=tile_size)
    # One graph per stage, released at its end: every call of a stage has one shape (tiles are equal).
    assert graph_sizes == [1, 1]
    assert [s.num_tiles for s in out.plan.stages] == ([1, 1] if tile_size is None else [2, 6])
    torch.testing.assert_close(out.images, eager, **_tolerance(dtype))


@pytest.mark.cuda
def test_graphs_and_their_memory_are_released_after_each_call(tiny_sdxl_path, graph_sizes):
    pipe = _cuda_pipe(tiny_sdxl_path, torch.float16, gspn=True)
    reserved = []
    for _ in range(3):
        _generate(pipe, output_type="np")
        reserved.append(torch.cuda.memory_reserved())
        assert pipe._graphed_unet is None
    assert graph_sizes == [1, 1] * 3
    assert reserved[2] <= reserved[1], reserved


@pytest.mark.cuda
def test_stages_above_the_threshold_run_eagerly(tiny_sdxl_path, graph_sizes, monkeypatch):
    pipe = _cuda_pipe(tiny_sdxl_path, torch.float32, gspn=True)
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHED_LATENT_PIXELS", 40 * 40)  # stage 0: 36x28, stage 1: 64x48
    out = _generate(pipe)
    assert graph_sizes == [1, 0]
    pipe.cuda_graphs = False
    torch.testing.assert_close(out.images, _generate(pipe).images, **_tolerance(torch.float32))
