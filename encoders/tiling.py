"""Tile geometry shared by the image transform and the tiled encoders (Llama 3.2 Vision conventions).

An image is cut into an `h × w` grid of square tiles (`h·w ≤ max_tiles`). Each grid shape has an
aspect-ratio id: its 1-based index in `supported_aspect_ratios(max_tiles)`; id 0 marks a padding image.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All `(h, w)` tile grids with `h·w ≤ max_tiles`, in HF/Meta order.

    For 4 tiles: (1,1), (1,2), (1,3), (1,4), (2,1), (2,2), (3,1), (4,1) → ids 1..8.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def aspect_ratio_id(grid: tuple[int, int], max_tiles: int) -> int:
    """The 1-based id of an `(h, w)` grid; a clear error for a grid that exceeds `max_tiles`."""
    ratios = supported_aspect_ratios(max_tiles)
    grid = (int(grid[0]), int(grid[1]))
    if grid not in ratios:
        raise ValueError(f"tile grid {grid} is not supported with max_tiles={max_tiles}; supported: {list(ratios)}")
    return ratios.index(grid) + 1


def num_aspect_ratio_ids(max_tiles: int) -> int:
    """Rows of a per-aspect-ratio embedding table: the supported grids plus id 0 (padding)."""
    return len(supported_aspect_ratios(max_tiles)) + 1
