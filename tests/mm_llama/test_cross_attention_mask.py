"""Which text sees which image: hand-worked ranges and masks."""

from __future__ import annotations

import pytest
import torch

from mm_llama.cross_attention_mask import attention_masks, flatten_key_mask, image_token_ranges, text_image_mask

I = 99  # the image token in these examples


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([1, I, 5, 6], [(1, 4)]),                       # one image: to the end
        ([1, 5, I, 6, 7], [(2, 5)]),                    # text before the image sees nothing
        ([1, I, 5, I, 6, 7], [(1, 3), (3, 6)]),         # each image until the next one
        ([1, I, I, 5, 6], [(1, 5), (2, 5)]),            # consecutive images share the following text
        ([I, I, 5, I, 6], [(0, 3), (1, 3), (3, 5)]),    # a run, then a later image
        ([1, 5, 6], []),
    ],
)
def test_image_token_ranges(tokens: list[int], expected: list[tuple[int, int]]) -> None:
    assert image_token_ranges(tokens, I) == expected


def test_dense_mask_covers_real_tiles_only() -> None:
    tokens = torch.tensor([[1, I, 5, I, 6], [1, 5, I, 6, 7]])
    mask = text_image_mask(tokens, I, [[2, 3], [4]], max_tiles=4)
    assert mask.shape == (2, 5, 2, 4)
    assert mask[0, 1:3, 0, :2].all() and not mask[0, 1:3, 0, 2:].any() and not mask[0, 3:, 0].any()
    assert mask[0, 3:, 1, :3].all() and not mask[0, :3, 1].any()
    assert mask[1, 2:, 0].all() and not mask[1, :2].any() and not mask[1, :, 1].any()  # padding image slot


def test_image_count_must_match_image_tokens() -> None:
    with pytest.raises(ValueError, match="sample 0 has 2 <\\|image\\|> token\\(s\\) but 1 image\\(s\\)"):
        text_image_mask(torch.tensor([[I, 5, I]]), I, [[1]], max_tiles=4)


def test_attention_masks_drop_the_sdpa_mask_when_rows_are_all_or_nothing() -> None:
    dense = text_image_mask(torch.tensor([[1, 5, I, 6]]), I, [[4]], max_tiles=4)
    mask, rows = attention_masks(flatten_key_mask(dense, tokens_per_tile=3))
    assert mask is None
    assert rows[0, :, 0].tolist() == [False, False, True, True]


def test_attention_masks_keep_key_padding_and_open_image_less_rows() -> None:
    dense = text_image_mask(torch.tensor([[1, I, 6]]), I, [[2]], max_tiles=4)
    mask, rows = attention_masks(flatten_key_mask(dense, tokens_per_tile=3))
    assert mask.shape == (1, 1, 3, 12)
    assert mask[0, 0, 1].tolist() == [True] * 6 + [False] * 6  # padding tiles are not keys
    assert mask[0, 0, 0].all()  # the image-less row attends to everything, then is zeroed by its row mask
    assert rows[0, :, 0].tolist() == [False, True, True]
