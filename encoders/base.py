"""The interface every image encoder implements, so fusion code never depends on which one it gets."""

from __future__ import annotations

import abc

import torch
from torch import nn


class TiledImageEncoder(nn.Module, abc.ABC):
    """Encodes batches of tiled images into per-tile token features.

    Attributes every implementation sets:
      `tile_size` (pixels per tile side), `max_tiles`, `tokens_per_tile` (patches + CLS),
      `out_dim` (features per token, e.g. 7680 = 1280 × (5 taps + final) for Llama 3.2 Vision).
    """

    tile_size: int
    max_tiles: int
    tokens_per_tile: int
    out_dim: int

    @abc.abstractmethod
    def forward(
        self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, tile_mask: torch.Tensor
    ) -> torch.Tensor:
        """`pixels [B, N, T, 3, H, W]` (normalised tiles, T = max_tiles), `aspect_ratio_ids [B, N]`
        (1-based, 0 = padding image), `tile_mask [B, N, T]` (True = real tile) →
        features `[B, N, T, tokens_per_tile, out_dim]`."""
