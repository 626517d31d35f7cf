"""Tile grids cover the whole grid and their blending weights sum to one everywhere."""

import pytest
import torch

from gspn_diffusers.pipelines.tiling import Tile, TileGrid, axis_starts, axis_weights

GRIDS = [
    # height, width, tile, overlap, margin, align
    (64, 64, 32, 8, 2, 1),
    (100, 37, 24, 6, 1, 4),
    (128, 96, (48, 40), 12, 3, 4),
    (33, 200, 32, 8, 0, 1),
    (16, 16, 32, 8, 2, 1),  # one tile bigger than the grid
    (1024, 768, 128, 32, 8, 4),
]


def _total_weight(grid: TileGrid) -> torch.Tensor:
    total = torch.zeros(grid.height, grid.width, dtype=torch.float64)
    for index, tile in enumerate(grid.tiles):
        rows, cols = tile.slices()
        total[rows, cols] += grid.weight(index).double()
    return total


@pytest.mark.parametrize("height,width,tile,overlap,margin,align", GRIDS)
def test_weights_sum_to_one_everywhere(height, width, tile, overlap, margin, align):
    grid = TileGrid(height, width, tile, overlap, margin, align)
    total = _total_weight(grid)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6), (total.min(), total.max())


@pytest.mark.parametrize("height,width,tile,overlap,margin,align", GRIDS)
def test_tiles_are_equal_in_bounds_and_cover_the_grid(height, width, tile, overlap, margin, align):
    grid = TileGrid(height, width, tile, overlap, margin, align)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for t in grid.tiles:
        assert (t.height, t.width) == (grid.tile_height, grid.tile_width)
        assert 0 <= t.top and t.top + t.height <= height and 0 <= t.left and t.left + t.width <= width
        rows, cols = t.slices()
        covered[rows, cols] = True
    assert covered.all()


def test_blending_reproduces_a_field_the_tiles_agree_on():
    grid = TileGrid(70, 90, 32, 8, 2, 4)
    field = torch.randn(70, 90)
    blended = torch.zeros_like(field)
    for tile, weight in grid.items():
        rows, cols = tile.slices()
        blended[rows, cols] += field[rows, cols] * weight
    assert torch.allclose(blended, field, atol=1e-5)


def test_ramps_are_smooth_with_weightless_margins():
    starts = axis_starts(56, 32, 8)
    assert starts == [0, 24]
    first, second = axis_weights(56, starts, 32, margin=2)
    ramp = first[24:]  # the 8 positions the two tiles share
    assert first[:24].eq(1).all() and second[8:].eq(1).all()
    assert ramp[-2:].eq(0).all() and second[:2].eq(0).all()  # weightless margins at the tiles' edges
    assert (ramp[1:] <= ramp[:-1]).all() and 0 < ramp[3] < 1


def test_starts_are_aligned_except_the_last():
    starts = axis_starts(1000, 128, 32, align=4)
    assert starts[0] == 0 and starts[-1] == 1000 - 128
    assert all(s % 4 == 0 for s in starts[:-1])
    assert all(b - a <= 128 - 32 + 4 for a, b in zip(starts, starts[1:]))  # overlap kept (up to alignment)


def test_tile_slices_scale_to_a_finer_grid():
    rows, cols = Tile(2, 3, 4, 5).slices(8)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (16, 48, 24, 64)


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        axis_starts(100, 16, 16)
