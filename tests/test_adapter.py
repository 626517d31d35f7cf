"""GSPNAdapter on the tiny SDXL UNet (CPU, reference backend)."""

import math
import runpy
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from gspn_diffusers import GSPN2AttnProcessor, GSPNAdapter
from gspn_diffusers.testing import TINY_TEXT_HIDDEN, tiny_unet_config


def unet_inputs(height, width, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, height, width, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, 2 * TINY_TEXT_HIDDEN, generator=g),
        added_cond_kwargs=dict(
            text_embeds=torch.randn(batch, TINY_TEXT_HIDDEN, generator=g),
            time_ids=torch.randn(batch, 6, generator=g),
        ),
    )


def run(unet, height=32, width=32, seed=0):
    with torch.no_grad():
        return unet(**unet_inputs(height, width, seed)).sample


def load_unet(path):
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()


@pytest.fixture(scope="module")
def unet(tiny_sdxl_path):
    return load_unet(tiny_sdxl_path)


@pytest.fixture(scope="module")
def adapter(unet):
    return GSPNAdapter.for_unet(unet, chunk_size={"mid_block.attentions.0.transformer_blocks.1.attn1": 2})


@pytest.fixture(scope="module")
def teacher_output(unet):
    return run(unet)


@pytest.fixture()
def mounted(unet, adapter):
    with adapter.mounted(unet):
        yield adapter


def test_every_attn1_is_swapped_and_no_attn2(unet, mounted):
    processors = unet.attn_processors
    attn1 = {k for k in processors if k.endswith("attn1.processor")}
    assert len(attn1) == 11 and len(processors) == 22
    for key, processor in processors.items():
        assert isinstance(processor, GSPN2AttnProcessor) == (key in attn1), key
    assert {layer + ".processor" for layer in mounted.config.layers} == attn1
    assert mounted["mid_block.attentions.0.transformer_blocks.1.attn1"].chunk_size == 2
    assert mounted["down_blocks.1.attentions.0.transformer_blocks.0.attn1"].chunk_size is None


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40), (40, 16)])
def test_forward_at_several_aspect_ratios(unet, mounted, teacher_output, height, width):
    out = run(unet, height, width)
    assert out.shape == (2, 4, height, width) and torch.isfinite(out).all()
    # The hooks handed every processor the grid of its own level.
    assert mounted["down_blocks.1.attentions.0.transformer_blocks.0.attn1"].grid == (height // 2, width // 2)
    assert mounted["mid_block.attentions.0.transformer_blocks.0.attn1"].grid == (height // 4, width // 4)
    if (height, width) == (32, 32):
        assert not torch.allclose(out, teacher_output, atol=1e-3)


def test_save_and_load_give_identical_outputs(unet, adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = GSPNAdapter.from_pretrained(tmp_path)
    assert loaded.config.layers == adapter.config.layers
    assert loaded.config.chunk_sizes == adapter.config.chunk_sizes
    with adapter.mounted(unet):
        before = run(unet, 24, 40)
    with loaded.mounted(unet):
        after = run(unet, 24, 40)
    assert torch.equal(before, after)


def test_unmount_gives_the_teacher_back_exactly(unet, adapter, teacher_output):
    originals = unet.attn_processors
    own_state = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter.mount(unet)
    assert any(".processor." in k for k in unet.state_dict())
    run(unet)
    adapter.unmount(unet)
    assert all(unet.attn_processors[k] is p for k, p in originals.items())
    assert unet.state_dict().keys() == own_state.keys()
    assert all(torch.equal(v, own_state[k]) for k, v in unet.state_dict().items())
    assert torch.equal(run(unet), teacher_output)
    assert all(p.grid is None for p in adapter.processors)


def test_mismatched_checkpoints_are_refused_naming_the_layer(unet, teacher_output):
    torch.manual_seed(0)
    wider = UNet2DConditionModel(**{**tiny_unet_config(), "block_out_channels": (32, 96, 96)})
    first = r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1'"
    with pytest.raises(ValueError, match=first + r".* 64 .* 96"):
        GSPNAdapter.for_unet(wider).mount(unet)
    missing = "down_blocks.1.attentions.0.transformer_blocks.7.attn1"
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        GSPNAdapter([missing], [64]).mount(unet)
    cross = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(ValueError, match="cross-attention"):
        GSPNAdapter([cross], [64]).mount(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert torch.equal(run(unet), teacher_output)


def test_mounting_twice_is_refused(unet, adapter):
    other = GSPNAdapter.for_unet(unet)
    with adapter.mounted(unet):
        with pytest.raises(RuntimeError, match="already mounted"):
            adapter.mount(unet)
        with pytest.raises(RuntimeError, match="already has a GSPN processor"):
            other.mount(unet)
    with pytest.raises(RuntimeError, match="not mounted"):
        adapter.unmount(unet)


def test_frozen_unet_trains_only_the_gspn_parameters(tiny_sdxl_path):
    unet = load_unet(tiny_sdxl_path).requires_grad_(False)
    own = list(unet.parameters())
    adapter = GSPNAdapter.for_unet(unet)
    with adapter.mounted(unet):
        unet(**unet_inputs(16, 24)).sample.square().mean().backward()
    assert all(p.grad is None for p in own)
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _attn1_relative_errors(unet, adapter, student):
    """Mean over layers of ||student - teacher|| / ||teacher||, both fed the teacher's attn1 inputs."""
    modules = adapter.attention_modules(unet)
    recorded = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: recorded.__setitem__(name, (args[0], out)))
        for name, module in modules.items()
    ]
    run(unet)
    for hook in hooks:
        hook.remove()
    errors = []
    for name, (tokens, teacher) in recorded.items():
        processor = student[name]
        side = math.isqrt(tokens.shape[1])  # square latents: square grids
        processor.grid = (side, side)
        with torch.no_grad():
            out = processor(modules[name], tokens)
        processor.grid = None
        errors.append(((out - teacher).norm() / teacher.norm()).item())
    return sum(errors) / len(errors)


def test_initialised_student_starts_closer_to_the_teacher_than_a_random_one(unet, adapter):
    torch.manual_seed(0)
    random = GSPNAdapter(adapter.config.layers, adapter.config.query_dims, chunk_sizes=adapter.config.chunk_sizes)
    student_error = _attn1_relative_errors(unet, adapter, adapter)
    random_error = _attn1_relative_errors(unet, adapter, random)
    # Measured: initialised 0.86, random 1.33 (0 would be the teacher, 1 an all-zero output). The
    # tiny UNet's W_v is a random 64x64 matrix, so its rank-8 part is weak; SDXL's is not.
    assert student_error < 0.95 and random_error > 1.1
    assert random_error - student_error > 0.25


def test_dtype_follows_the_unet_unless_asked_not_to(tiny_sdxl_path):
    unet = load_unet(tiny_sdxl_path).to(torch.bfloat16)
    adapter = GSPNAdapter.for_unet(unet)
    assert adapter.dtype == torch.float32
    with adapter.mounted(unet, match_dtype=False):
        assert adapter.dtype == torch.float32
        inputs = unet_inputs(16, 16)
        for key in ("sample", "encoder_hidden_states"):
            inputs[key] = inputs[key].bfloat16()
        inputs["added_cond_kwargs"] = {k: v.bfloat16() for k, v in inputs["added_cond_kwargs"].items()}
        with torch.no_grad():
            out = unet(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with adapter.mounted(unet):
        assert adapter.dtype == torch.bfloat16


def test_for_unet_refuses_unknown_chunk_layers(unet):
    with pytest.raises(ValueError, match="not attn1"):
        GSPNAdapter.for_unet(unet, chunk_size={"up_blocks.9.attn1": 4})


def test_unet_benchmark_smoke_runs_on_cpu(capsys):
    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_unet.py"))
    bench["main"](["--tiny", "--sizes", "64", "96x64", "--budget-s", "0", "--max-repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|") for line in lines if line.strip().startswith(("64x64", "96x64"))]
    # size | softmax | gspn | gspn-fused | floor | host times | peaks
    assert len(rows) == 2 and all(len(row) == 7 and all("x)" in row[i] for i in (1, 2, 3)) for row in rows)
    assert all(len(row[5].split()) == 4 for row in rows)


def test_an_adapter_for_fewer_transformer_layers_is_refused_unless_partial(unet, teacher_output):
    config = dict(tiny_unet_config(), transformer_layers_per_block=(1, 1, 1))
    smaller = GSPNAdapter.for_unet(UNet2DConditionModel(**config))
    uncovered = sorted(set(smaller.uncovered_layers(unet)))
    assert uncovered == ["down_blocks.2.attentions.0.transformer_blocks.1.attn1",
                         "mid_block.attentions.0.transformer_blocks.1.attn1",
                         "up_blocks.0.attentions.0.transformer_blocks.1.attn1",
                         "up_blocks.0.attentions.1.transformer_blocks.1.attn1"]
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError) as error:
        smaller.mount(unet)
    assert all(layer in str(error.value) for layer in uncovered) and "partial=True" in str(error.value)
    assert not smaller.is_mounted and unet.attn_processors == before  # nothing changed

    with smaller.mounted(unet, partial=True):
        processors = unet.attn_processors
        assert all(isinstance(processors[layer + ".processor"], GSPN2AttnProcessor) for layer in smaller.config.layers)
        assert all(processors[layer + ".processor"] is before[layer + ".processor"] for layer in uncovered)
        assert torch.isfinite(run(unet)).all()
    assert unet.attn_processors == before


def test_unmounted_runs_the_teacher_then_mounts_again_as_it_was(tiny_sdxl_path):
    unet = load_unet(tiny_sdxl_path)
    teacher = run(unet)
    config = dict(tiny_unet_config(), transformer_layers_per_block=(1, 1, 1))
    smaller = GSPNAdapter.for_unet(UNet2DConditionModel(**config)).double()  # needs partial=True on this UNet
    smaller.fuse_projections()
    smaller.mount(unet, match_dtype=False, partial=True)
    mounted = dict(unet.attn_processors)
    with smaller.unmounted(unet):
        assert not smaller.is_mounted and not smaller.is_mounted_on(unet)
        assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
        assert torch.equal(run(unet), teacher)
    assert smaller.is_mounted_on(unet) and unet.attn_processors == mounted
    assert smaller.dtype == torch.float64  # match_dtype=False again (True would cast to the UNet's float32)
    assert all(p.projections_fused for p in smaller.processors)

    with pytest.raises(KeyError), smaller.unmounted(unet):
        raise KeyError("inside")
    assert smaller.is_mounted_on(unet) and unet.attn_processors == mounted
    smaller.unmount(unet)
    with pytest.raises(RuntimeError, match="not mounted"), smaller.unmounted(unet):
        pass
