"""Which text token sees which image: ranges from `<|image|>` positions, dense masks over tiles and tokens.

Rule (Meta / HF Mllama, REFERENCE.md §2): image j is seen from its `<|image|>` token (inclusive) up to the
next image token; a run of consecutive image tokens all extend over the text that follows the run; the
last image runs to the end; text before the first image sees nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch


def image_token_ranges(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """`(start, end)` (end exclusive) of the text each image in `tokens` is seen by, in image order."""
    positions = [i for i, t in enumerate(tokens) if t == image_token_id]
    ranges = [[p, q] for p, q in zip(positions, positions[1:] + [len(tokens)])]
    extend_to = len(tokens)
    for r in reversed(ranges):
        if r[1] == r[0] + 1:  # directly followed by another image token: share that image's text
            r[1] = extend_to
        extend_to = r[1]
    return [(a, b) for a, b in ranges]


def text_image_mask(
    tokens: torch.Tensor, image_token_id: int, num_tiles: Sequence[Sequence[int]], max_tiles: int
) -> torch.Tensor:
    """Dense mask `[B, T, N, max_tiles]` (bool): text row t of sample b may attend tile k of image n.

    `tokens [B, T]`; `num_tiles[b]` lists the real tiles of each image of sample b (N = the longest list).
    The number of `<|image|>` tokens in each sample must equal its number of images.
    """
    batch, length = tokens.shape
    n_images = max((len(n) for n in num_tiles), default=0)
    mask = torch.zeros(batch, length, n_images, max_tiles, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        ranges = image_token_ranges(row, image_token_id)
        if len(ranges) != len(num_tiles[b]):
            raise ValueError(
                f"sample {b} has {len(ranges)} <|image|> token(s) but {len(num_tiles[b])} image(s); "
                "put exactly one <|image|> token in the text for each image"
            )
        for n, ((start, end), tiles) in enumerate(zip(ranges, num_tiles[b])):
            mask[b, start:end, n, :tiles] = True
    return mask.to(tokens.device)


def flatten_key_mask(mask: torch.Tensor, tokens_per_tile: int) -> torch.Tensor:
    """`[B, T, N, tiles]` → key mask `[B, T, N·tiles·tokens_per_tile]` over flattened vision tokens."""
    return mask.repeat_interleave(tokens_per_tile, dim=3).flatten(2)


def attention_masks(key_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """SDPA mask and row mask from `key_mask [B, T, S]`.

    Returns `(mask [B, 1, T, S] or None, row_mask [B, T, 1])`. Rows that see no image attend to every key
    (their output is zeroed by the row mask, as in Meta's reference); when every row sees either all keys
    or none, the SDPA mask is dropped altogether so the fast mask-free kernels apply.
    """
    row_mask = key_mask.any(dim=-1, keepdim=True)
    full = key_mask | ~row_mask
    if bool(full.all()):
        return None, row_mask
    return full[:, None], row_mask
