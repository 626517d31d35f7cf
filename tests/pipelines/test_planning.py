"""The planner: stage sizes, steps, UNet layouts and VAE tiles from a memory budget, and refusals."""

import math

import pytest

from gspn_diffusers.pipelines.memory import (
    GIB,
    SDXL_UNET_BYTES_PER_LATENT_PIXEL,
    SDXL_VAE_BYTES_PER_PIXEL,
    MemoryModel,
)
from gspn_diffusers.pipelines.planning import default_strength, make_plan, shrink_stage, stage_sizes

# The full SDXL pipeline in float16 (UNet 4.9 GiB, text encoders and VAE ~2 GiB), VAE in bfloat16.
SDXL = MemoryModel(SDXL_UNET_BYTES_PER_LATENT_PIXEL, 4, SDXL_VAE_BYTES_PER_PIXEL, resident_bytes=int(6.9 * GIB))


def plan(height, width, budget_gib, **kwargs):
    return make_plan(height=height, width=width, base_size=1024, vae_scale_factor=8, memory=SDXL,
                     memory_budget=int(budget_gib * GIB), **kwargs)


def test_direct_up_to_the_base_area():
    assert stage_sizes(1024, 1024, 1024, 8) == [(1024, 1024)]
    assert stage_sizes(768, 1344, 1024, 8) == [(768, 1344)]
    assert stage_sizes(256, 256, 1024, 8) == [(256, 256)]


def test_powers_of_two_go_up_by_exactly_two():
    assert stage_sizes(4096, 4096, 1024, 8) == [(1024, 1024), (2048, 2048), (4096, 4096)]
    sizes = stage_sizes(16384, 16384, 1024, 8)
    assert sizes == [(1024 * 2**k, 1024 * 2**k) for k in range(5)]


@pytest.mark.parametrize("height,width", [(3000, 2000), (2100, 2100), (1032, 1032), (16384, 1024), (5000, 7992)])
def test_any_size_ends_exactly_with_stages_of_at_most_two(height, width):
    sizes = stage_sizes(height, width, 1024, 8)
    assert sizes[-1] == (height, width)
    base_h, base_w = sizes[0]
    assert 0.8 < base_h * base_w / 1024**2 < 1.2
    assert abs(base_h / base_w - height / width) / (height / width) < 0.15
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]):
        assert 1 < h1 / h0 <= 2.1 and 1 < w1 / w0 <= 2.1
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes[:-1])


def test_enough_memory_runs_every_stage_whole_and_batched():
    p = plan(4096, 4096, 65)
    assert [(s.height, s.width) for s in p.stages] == [(1024, 1024), (2048, 2048), (4096, 4096)]
    assert all(s.tile is None and s.num_tiles == 1 and not s.cfg_sequential for s in p.stages)
    assert p.predicted_peak_bytes <= SDXL.resident_bytes + 65 * GIB


def test_16k_on_80gb_runs_the_whole_latent_with_cfg_halves_one_after_the_other():
    # Measured on one H100, see docs/benchmarks.md: the UNet at 16K fits at batch 1 (44.9 GiB) but not at batch 2.
    p = plan(16384, 16384, 0.9 * (80 - 6.9))
    last = p.stages[-1]
    assert last.tile is None and last.cfg_sequential
    assert not p.stages[-2].cfg_sequential  # 8K still batched
    assert p.predicted_peak_bytes < 80 * GIB
    assert p.decode.grid is not None and p.decode.num_tiles == 81  # 9 x 9 tiles of at most 2048 px


def test_cfg_sequential_between_batch_one_and_batch_two():
    pixels = (2048 // 8) ** 2
    one = SDXL.stage_bytes(pixels, pixels, 1, 1)
    two = SDXL.stage_bytes(pixels, pixels, 2, 1)
    p = plan(2048, 2048, (one + two) / 2 / GIB)
    assert p.stages[-1].tile is None and p.stages[-1].cfg_sequential
    assert not p.stages[0].cfg_sequential


def test_small_budget_tiles_the_large_stages_within_the_budget():
    budget = 3
    p = plan(8192, 8192, budget)
    tiled = [s for s in p.stages if s.tile is not None]
    assert tiled and tiled[-1].index == len(p.stages) - 1
    for s in p.stages:
        assert s.predicted_bytes <= budget * GIB
    last = tiled[-1]
    assert last.num_tiles > 1 and last.tile[0] < 8192 // 8
    # tiles no larger than their count needs: overlap costs at most ~1.5x the stage's area
    assert last.num_tiles * last.tile[0] * last.tile[1] < 1.6 * (8192 // 8) ** 2


def test_impossible_budget_is_refused():
    with pytest.raises(ValueError, match="does not fit the memory budget"):
        plan(4096, 4096, 0.01)
    with pytest.raises(ValueError, match="does not fit"):
        plan(1024, 1024, 0.1, tile_size=1024)


def test_without_cfg_one_batch():
    p = plan(2048, 2048, 1.5, cfg=False)
    assert p.stages[-1].tile is None and not p.stages[-1].cfg_sequential


def test_forced_tile_size_tiles_larger_stages_only():
    p = plan(4096, 4096, 65, tile_size=2048)
    assert [s.tile for s in p.stages] == [None, None, (256, 256)]
    assert p.stages[-1].num_tiles == 9  # 3 x 3 with a quarter overlap


@pytest.mark.parametrize("height,width", [(1000, 1001), (4100, 4096), (0, 1024), (-8, 1024)])
def test_sizes_not_multiples_of_the_vae_factor_are_refused(height, width):
    with pytest.raises(ValueError, match="multiple of 8"):
        plan(height, width, 65)


def test_bad_controls_are_refused():
    with pytest.raises(ValueError, match="upscale stage"):
        plan(4096, 4096, 65, strength=[0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="strength"):
        plan(4096, 4096, 65, strength=1.5)
    with pytest.raises(ValueError, match="upsample_guidance"):
        plan(4096, 4096, 65, upsample_guidance=-0.1)
    with pytest.raises(ValueError, match="stage_steps"):
        plan(4096, 4096, 65, stage_steps=[30, 10])
    with pytest.raises(ValueError, match="tile_size"):
        plan(4096, 4096, 65, tile_size=100)


def test_steps_follow_strength_or_stage_steps():
    p = plan(4096, 4096, 65, num_inference_steps=30)
    assert [s.strength for s in p.stages] == [1.0, default_strength(1), default_strength(2)]
    assert [s.steps for s in p.stages] == [30, int(30 * default_strength(1)), int(30 * default_strength(2))]
    p = plan(4096, 4096, 65, strength=[0.3, 0.6], stage_steps=[20, 6, 9])
    assert [(s.steps, s.strength) for s in p.stages] == [(20, 1.0), (6, 0.3), (9, 0.6)]
    assert [s.schedule_steps for s in p.stages] == [20, 20, 15]


def test_plan_prints_a_table():
    text = str(plan(16384, 16384, 65))
    for k in range(5):
        size = 1024 * 2**k
        assert f"{size}x{size}" in text
    assert "predicted peak" in text and "VAE" in text


def test_shrinking_halves_the_tile_then_splits_cfg_then_gives_up():
    p = plan(2048, 2048, 65)
    stage = p.stages[-1]
    smaller = shrink_stage(p, stage)
    assert smaller.tile is not None
    assert math.isclose(smaller.tile[0] * smaller.tile[1] / 256**2, 0.5, abs_tol=0.05)
    assert smaller.predicted_bytes < stage.predicted_bytes
    tiny = smaller
    while tiny.tile[0] > 16 * math.sqrt(2):
        tiny = shrink_stage(p, tiny)
    assert not tiny.cfg_sequential
    sequential = shrink_stage(p, tiny)
    assert sequential.cfg_sequential and sequential.tile == tiny.tile
    with pytest.raises(RuntimeError):
        shrink_stage(p, sequential)


H200 = 0.9 * (141 - 6.9)


def test_two_processes_with_cfg_split_the_guidance_halves():
    one, two = plan(16384, 16384, H200), plan(16384, 16384, H200, num_processes=2)
    for s1, s2 in zip(one.stages, two.stages):
        assert s2.grid is None and [u.halves for u in s2.units] == [(0,), (1,)] and s2.owners == (0, 1)
        assert s2.predicted_bytes <= s1.predicted_bytes
    assert two.predicted_peak_bytes <= one.predicted_peak_bytes
    assert "process 1: stage 0: cond" in str(two)


def test_without_cfg_two_processes_tile_the_upscale_stages_but_not_the_base():
    p = plan(4096, 4096, H200, cfg=False, num_processes=2)
    assert p.stages[0].grid is None and p.stages[0].owners == (0,)
    for s in p.stages[1:]:
        assert s.num_tiles == 2 and s.owners == (0, 1)


def test_eight_processes_keep_every_process_busy_within_the_one_process_memory():
    one, eight = plan(16384, 16384, H200), plan(16384, 16384, H200, num_processes=8)
    for s1, s8 in zip(one.stages[1:], eight.stages[1:]):
        assert sorted(set(s8.owners)) == list(range(8)) and len(s8.units) % 8 == 0
        assert s8.predicted_bytes <= s1.predicted_bytes
        # the busiest process computes at most a quarter of the one-process pixels
        per_unit = s8.tile[0] * s8.tile[1] * (2 if len(s8.units[0].halves) == 2 else 1)
        assert per_unit * len(s8.units) // 8 <= 0.25 * 2 * s8.latent_height * s8.latent_width
    decode = eight.decode
    assert sorted(set(decode.owners)) == list(range(8))
    assert max(decode.owners.count(r) for r in range(8)) - min(decode.owners.count(r) for r in range(8)) <= 1


def test_several_images_without_cfg_go_to_different_processes():
    p = plan(1024, 1024, H200, batch=4, cfg=False, num_processes=4)
    assert [u.images for u in p.stages[0].units] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert p.stages[0].owners == (0, 1, 2, 3)


def test_a_single_process_runs_every_unit_of_a_plan_for_several():
    stage = plan(4096, 4096, H200, num_processes=4).stages[-1]
    assert stage.units_of(0, 1) == list(stage.units)
    assert sum(len(stage.units_of(r, 4)) for r in range(4)) == len(stage.units)
    with pytest.raises(ValueError, match="num_processes"):
        plan(1024, 1024, H200, num_processes=0)


def test_auto_attention_is_softmax_in_the_base_stage_and_gspn_above():
    assert [s.attention for s in plan(16384, 16384, H200).stages] == ["softmax"] + ["gspn"] * 4
    assert [s.attention for s in plan(16384, 16384, H200, num_processes=8).stages] == ["softmax"] + ["gspn"] * 4
    for height, width in ((1024, 1024), (768, 1344), (512, 512)):  # one stage, at or below the base area
        assert [s.attention for s in plan(height, width, H200).stages] == ["softmax"]
    # rounding to the latent alignment puts this base stage 2% above the base area: still softmax
    base = plan(1032, 1288, H200).stages[0]
    assert base.height * base.width > 1024**2 and base.attention == "softmax"
    # without an adapter, softmax everywhere
    assert [s.attention for s in plan(4096, 4096, H200, gspn_available=False).stages] == ["softmax"] * 3


def test_stage_attention_overrides_every_stage_or_each_one():
    assert [s.attention for s in plan(4096, 4096, H200, stage_attention="gspn").stages] == ["gspn"] * 3
    assert [s.attention for s in plan(4096, 4096, H200, stage_attention="softmax").stages] == ["softmax"] * 3
    chosen = ["gspn", "softmax", "gspn"]
    assert [s.attention for s in plan(4096, 4096, H200, stage_attention=chosen).stages] == chosen
    assert [s.attention for s in plan(4096, 4096, H200, stage_attention=tuple(chosen)).stages] == chosen
    assert [s.attention for s in plan(4096, 4096, H200, stage_attention="softmax",
                                      gspn_available=False).stages] == ["softmax"] * 3


@pytest.mark.parametrize("value,match", [
    (["softmax", "gspn"], "stage_attention has 2 values but this size has 3 stage"),
    ("flash", "stage_attention must be"),
    (["softmax", "gspn", "GSPN"], "stage_attention must be"),
    (1, "stage_attention must be"),
    (["softmax", None, "gspn"], "stage_attention must be"),
])
def test_bad_stage_attention_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        plan(4096, 4096, 65, stage_attention=value)


def test_gspn_without_an_adapter_is_refused():
    for value in ("gspn", ["softmax", "softmax", "gspn"]):
        with pytest.raises(ValueError, match="stage_attention asks for 'gspn' but .* no GSPN adapter"):
            plan(4096, 4096, 65, stage_attention=value, gspn_available=False)


def test_the_printed_plan_names_each_stages_attention():
    lines = str(plan(4096, 4096, 65, stage_attention=["gspn", "softmax", "gspn"])).splitlines()
    column = lines[1].index("attention")
    rows = lines[2:5]
    assert [row.split()[0] for row in rows] == ["0", "1", "2"]
    assert [row[column:column + len("attention")].strip() for row in rows] == ["gspn", "softmax", "gspn"]


def test_shrinking_keeps_the_stages_attention():
    p = plan(2048, 2048, 65, stage_attention=["gspn", "softmax"])
    assert shrink_stage(p, p.stages[1]).attention == "softmax"
    assert shrink_stage(p, p.stages[0]).attention == "gspn"
