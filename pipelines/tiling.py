"""Overlapping tiles over a 2D grid and the blending weights that join them without seams.

A ``TileGrid`` covers an H x W grid (latent pixels) with equal-sized tiles that overlap their
neighbours. Each tile gets a weight map that is 1 in its own part of the grid, ramps down smoothly
(sin^2 / cos^2) across the overlap with a neighbour and is 0 in a ``margin`` at its borders with
neighbours (where a tile's output suffers most from not seeing past its edge). The weights of all
tiles sum to one at every position, so blending tile outputs with them is an interpolation, never a
change of scale.

Weights are separable: the weight of tile (i, j) is ``row_weights[i][:, None] * col_weights[j][None, :]``
and each axis' 1D weights are normalised to sum to one, so the 2D weights do too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``top : top + height`` and columns ``left : left + width`` of the grid."""

    top: int
    left: int
    height: int
    width: int

    def slices(self, scale: int = 1) -> tuple[slice, slice]:
        """(row slice, column slice) of this tile on a grid ``scale`` times finer (e.g. 8 for pixels)."""
        return (
            slice(self.top * scale, (self.top + self.height) * scale),
            slice(self.left * scale, (self.left + self.width) * scale),
        )


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``range(length)`` with at least ~``overlap`` shared.

    Tiles are spread evenly; starts are rounded down to multiples of ``align`` except the last,
    which ends exactly at ``length``. One tile when ``tile >= length``.
    """
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile); got overlap {overlap} for tile {tile}")
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    starts = [int(i * stride) // align * align for i in range(count - 1)] + [length - tile]
    return sorted(set(starts))


def axis_weights(length: int, starts: list[int], tile: int, margin: int = 0) -> list[torch.Tensor]:
    """Float64 1D weights (each of size ``min(tile, length)``) for tiles at ``starts``; they sum to one.

    Across the overlap of two neighbours, the first ramps from 1 to 0 and the second from 0 to 1 over
    the overlap less ``margin`` at each end.
    """
    tile = min(tile, length)
    raw = []
    for k, start in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float64)
        if k > 0:
            shared = starts[k - 1] + tile - start
            w[:shared] = _ramp_up(shared, margin)
        if k < len(starts) - 1:
            shared = start + tile - starts[k + 1]
            w[tile - shared:] = torch.minimum(w[tile - shared:], _ramp_up(shared, margin).flip(0))
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(starts, raw):
        total[start:start + tile] += w
    if not bool((total > 0).all()):
        raise ValueError(f"tiles at {starts} (size {tile}, margin {margin}) leave part of 0..{length} unweighted")
    return [w / total[start:start + tile] for start, w in zip(starts, raw)]


def _ramp_up(shared: int, margin: int) -> torch.Tensor:
    """Size ``shared``: 0 over ``margin``, sin^2 ramp from 0 to 1, then 1 over the last ``margin``."""
    if shared <= 0:
        return torch.ones(0, dtype=torch.float64)
    margin = max(0, min(margin, (shared - 1) // 2))
    ramp_len = shared - 2 * margin
    ramp = torch.sin(0.5 * math.pi * (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len) ** 2
    return torch.cat([torch.zeros(margin, dtype=torch.float64), ramp, torch.ones(margin, dtype=torch.float64)])


def context_shape(height: int, width: int, context_size: int) -> tuple[int, int]:
    """(h, w) of a whole-image context for an ``height x width`` grid: unchanged, or scaled so the
    longer side is ``context_size``."""
    longest = max(height, width)
    if longest <= context_size:
        return height, width
    return max(1, round(height * context_size / longest)), max(1, round(width * context_size / longest))


class TileGrid:
    """Tiles of ``tile = (th, tw)`` over an ``height x width`` grid, with their blending weights.

    ``items(device, scale)`` yields ``(Tile, weight)``, ``weight`` float32 (th * scale, tw * scale).
    """

    def __init__(
        self,
        height: int,
        width: int,
        tile: int | tuple[int, int],
        overlap: int,
        margin: int = 0,
        align: int = 1,
    ):
        tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
        self.height, self.width = height, width
        self.tile_height, self.tile_width = min(tile_h, height), min(tile_w, width)
        row_starts = axis_starts(height, tile_h, overlap, align)
        col_starts = axis_starts(width, tile_w, overlap, align)
        self.row_weights = axis_weights(height, row_starts, tile_h, margin)
        self.col_weights = axis_weights(width, col_starts, tile_w, margin)
        self.tiles = [
            Tile(top, left, self.tile_height, self.tile_width) for top in row_starts for left in col_starts
        ]
        self._weight_index = [(i, j) for i in range(len(row_starts)) for j in range(len(col_starts))]

    def __len__(self) -> int:
        return len(self.tiles)

    def weight(self, index: int, device=None, scale: int = 1) -> torch.Tensor:
        """Float32 (th * scale, tw * scale) weight of tile ``index``, each value repeated on a finer grid."""
        i, j = self._weight_index[index]
        w = (self.row_weights[i][:, None] * self.col_weights[j][None, :]).float().to(device)
        if scale > 1:
            w = w.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        return w

    def items(self, device=None, scale: int = 1):
        for index, tile in enumerate(self.tiles):
            yield tile, self.weight(index, device, scale)
