"""Tests for `mm_llama.data.collate`: padded text, image / video / audio batches with their media-count
checks, and duration bucketing (budget, completeness, determinism)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_llama.data.collate import (
    AudioTextBatch,
    BucketStats,
    ImageTextBatch,
    TextBatch,
    VideoTextBatch,
    bucket_by_duration,
    collate_audio,
    collate_audio_text,
    collate_image_text,
    collate_text,
    collate_video_text,
)
from mm_llama.data.image_transform import TiledImage
from mm_llama.data.prompts import IGNORE_INDEX, Example, build_example, speech_token_count
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer

TILE = 8
MAX_TILES = 4
PAD = 7


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("collate-tok")
    corpus = ["A red circle is on the left. What colour is it? Red. Repeat after me in English:"] * 4
    train_llama3_tokenizer(corpus, 290, out)
    return Tokenizer.from_tiktoken_model(out / "tokenizer.model")


@pytest.fixture(scope="module")
def media(tok: Tokenizer) -> MediaTokens:
    return MediaTokens(tok.vocab_size)


def tiled(grid: tuple[int, int], value: float = 1.0) -> TiledImage:
    n = grid[0] * grid[1]
    return TiledImage(tiles=torch.full((n, 3, TILE, TILE), value), grid=grid, aspect_ratio_id=1)


# ---------------------------------------------------------------------------------------- text
def test_collate_text_pads_right_and_masks_labels() -> None:
    a = Example(input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4])
    b = Example(input_ids=[5, 6], labels=[-100, 6])
    batch = collate_text([a, b], PAD)
    assert isinstance(batch, TextBatch)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, PAD, PAD]]
    assert batch.labels.tolist() == [[-100, -100, 3, 4], [-100, 6, -100, -100]]
    assert batch.attention_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long and batch.attention_mask.dtype == torch.bool
    assert batch.lengths.tolist() == [4, 2]


def test_pad_to_multiple() -> None:
    batch = collate_text([Example([1, 2, 3], [1, 2, 3])], PAD, pad_to_multiple=8)
    assert batch.input_ids.shape == (1, 8)
    assert batch.labels[0, 3:].eq(IGNORE_INDEX).all() and not batch.attention_mask[0, 3:].any()
    assert collate_text([Example([1] * 8, [1] * 8)], PAD, pad_to_multiple=8).input_ids.shape == (1, 8)


@pytest.mark.parametrize(
    "examples, kwargs, match",
    [
        ([], {}, "at least one"),
        ([Example([1], [1])], {"pad_to_multiple": 0}, "pad_to_multiple"),
        ([Example([], [])], {}, "empty"),
        (["not an example"], {}, "Example"),
    ],
)
def test_collate_text_errors(examples, kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        collate_text(examples, PAD, **kwargs)


def test_collate_text_rejects_missing_pad_id() -> None:
    with pytest.raises(ValueError, match="pad_id"):
        collate_text([Example([1], [1])], None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- images
def test_collate_image_text(tok: Tokenizer, media: MediaTokens) -> None:
    a = build_example(tok, media, "caption", {"caption": "A red circle is on the left."})
    b = build_example(tok, media, "vqa", {"question": "What colour is it?", "answer": "Red"})
    batch = collate_image_text([(a, [tiled((2, 2))]), (b, [tiled((1, 2))])], tok.pad_id, MAX_TILES, TILE)
    assert isinstance(batch, ImageTextBatch)
    assert batch.text.input_ids.shape == (2, max(len(a), len(b)))
    assert batch.images.pixels.shape == (2, 1, MAX_TILES, 3, TILE, TILE)
    assert batch.images.tile_mask.tolist() == [[[True] * 4], [[True, True, False, False]]]
    assert (batch.text.input_ids == media.image).sum(dim=1).tolist() == [1, 1]
    assert not (batch.text.labels == media.image).any()
    moved = batch.to("cpu", dtype=torch.float16)
    assert moved.images.pixels.dtype == torch.float16 and moved.text.input_ids.dtype == torch.long


def test_image_count_must_match_image_tokens(tok: Tokenizer, media: MediaTokens) -> None:
    ex = build_example(tok, media, "caption", {"caption": "A red circle."})
    with pytest.raises(ValueError, match=r"pair 0 \(task 'caption'\).*1 <\|image\|> token.*2 image"):
        collate_image_text([(ex, [tiled((1, 1)), tiled((1, 1))])], tok.pad_id, MAX_TILES, TILE)
    with pytest.raises(ValueError, match="0 image"):
        collate_image_text([(ex, [])], tok.pad_id, MAX_TILES, TILE)


def test_text_only_rows_and_hand_built_examples_need_media(tok: Tokenizer, media: MediaTokens) -> None:
    plain = Example(input_ids=[tok.bos_id, 5, 6], labels=[-100, 6, -100])
    with pytest.raises(ValueError, match="media="):
        collate_image_text([(plain, [])], tok.pad_id, MAX_TILES, TILE)
    batch = collate_image_text([(plain, [])], tok.pad_id, MAX_TILES, TILE, media=media)
    assert batch.images.pixels.shape == (1, 0, MAX_TILES, 3, TILE, TILE)


# ---------------------------------------------------------------------------------------- video
def test_collate_video_text(tok: Tokenizer, media: MediaTokens) -> None:
    a = build_example(tok, media, "video_caption", {"caption": "A red circle moves left."})
    b = build_example(tok, media, "video_qa", {"question": "What colour is it?", "answer": "Red"})
    clip_a = [tiled((1, 1), float(k)) for k in range(3)]
    clip_b = [tiled((2, 1)) for _ in range(5)]
    batch = collate_video_text([(a, clip_a), (b, clip_b)], tok.pad_id, MAX_TILES, TILE)
    assert isinstance(batch, VideoTextBatch)
    assert batch.frames.pixels.shape == (2, 5, MAX_TILES, 3, TILE, TILE)
    assert batch.frame_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.frames.pixels[0, 2, 0].eq(2.0).all() and batch.frames.pixels[0, 3].eq(0).all()
    fixed = collate_video_text([(a, clip_a)], tok.pad_id, MAX_TILES, TILE, max_frames=8)
    assert fixed.frames.pixels.shape[1] == 8 and fixed.frame_mask.sum().item() == 3


def test_video_example_needs_one_video_token_and_frames(tok: Tokenizer, media: MediaTokens) -> None:
    image_ex = build_example(tok, media, "caption", {"caption": "A red circle."})
    with pytest.raises(ValueError, match=r"0 <\|video\|> token"):
        collate_video_text([(image_ex, [tiled((1, 1))])], tok.pad_id, MAX_TILES, TILE)
    video_ex = build_example(tok, media, "video_caption", {"caption": "A red circle."})
    with pytest.raises(ValueError, match="no frames"):
        collate_video_text([(video_ex, [])], tok.pad_id, MAX_TILES, TILE)


# ---------------------------------------------------------------------------------------- audio
def test_collate_audio_pads_with_zeros() -> None:
    feats = [torch.randn(5, 80), torch.randn(9, 80)]
    out, lengths = collate_audio(feats)
    assert out.shape == (2, 9, 80) and lengths.tolist() == [5, 9] and lengths.dtype == torch.long
    assert torch.equal(out[0, :5], feats[0]) and out[0, 5:].eq(0).all() and torch.equal(out[1], feats[1])


@pytest.mark.parametrize(
    "feats, match",
    [
        ([], "at least one"),
        ([torch.randn(5, 80), torch.randn(5, 40)], "features per frame"),
        ([torch.randn(80)], "frames, 80"),
        ([torch.randn(0, 80)], "no frames"),
        ([torch.randn(3, 80), torch.randn(3, 80).double()], "dtype"),
    ],
)
def test_collate_audio_errors(feats, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        collate_audio(feats)


def test_collate_audio_text(tok: Tokenizer, media: MediaTokens) -> None:
    pairs = []
    for frames in (100, 37):
        fields = {"language": "en", "n_speech_tokens": speech_token_count(frames), "text": "a red circle"}
        pairs.append((build_example(tok, media, "asr", fields), torch.randn(frames, 80)))
    batch = collate_audio_text(pairs, tok.pad_id)
    assert isinstance(batch, AudioTextBatch)
    assert batch.features.shape == (2, 100, 80)
    assert batch.feature_lengths.tolist() == [100, 37]
    assert batch.durations.tolist() == pytest.approx([1.0, 0.37])
    assert (batch.text.input_ids == media.speech).sum(dim=1).tolist() == [13, 5]
    for m in media.all():
        assert not (batch.text.labels == m).any()


def test_speech_placeholders_must_match_the_features(tok: Tokenizer, media: MediaTokens) -> None:
    ex = build_example(tok, media, "asr", {"language": "en", "n_speech_tokens": 12, "text": "red"})
    with pytest.raises(ValueError, match=r"12 speech placeholder.*speech_token_count\(100\) = 13"):
        collate_audio_text([(ex, torch.randn(100, 80))], tok.pad_id)
    text_only = build_example(tok, media, "caption", {"caption": "red"})
    with pytest.raises(ValueError, match="speech span"):
        collate_audio_text([(text_only, torch.randn(100, 80))], tok.pad_id)


# ---------------------------------------------------------------------------------------- bucketing
def padded(batch: list[float]) -> float:
    return len(batch) * max(batch)


@given(
    durations=st.lists(st.floats(min_value=0.0, max_value=30.0, allow_nan=False), max_size=200),
    max_seconds=st.floats(min_value=1.0, max_value=120.0),
    buffer_size=st.integers(min_value=1, max_value=40),
    max_batch=st.none() | st.integers(min_value=1, max_value=8),
)
@settings(max_examples=150, deadline=None)
def test_bucketing_respects_the_budget_and_loses_nothing(durations, max_seconds, buffer_size, max_batch) -> None:
    items = list(enumerate(durations))
    stats = BucketStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(
            bucket_by_duration(iter(items), lambda it: it[1], max_seconds, buffer_size=buffer_size,
                               max_batch=max_batch, stats=stats)
        )
    oversized = [d for d in durations if d > max_seconds]
    for batch in batches:
        assert batch, "no empty batches"
        if max_batch is not None:
            assert len(batch) <= max_batch
        ds = [d for _, d in batch]
        if max(ds) > max_seconds:
            assert len(batch) == 1  # an oversized item goes alone
        else:
            assert padded(ds) <= max_seconds
    assert sorted(i for b in batches for i, _ in b) == list(range(len(items)))  # each item exactly once
    assert stats.items == len(items) and stats.batches == len(batches)
    assert stats.oversized == len(oversized) == len(caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = list(bucket_by_duration(items, lambda it: it[1], max_seconds, buffer_size=buffer_size,
                                        max_batch=max_batch))
    assert again == batches  # deterministic


def test_bucketing_sorts_within_a_buffer_and_carries_the_tail_once() -> None:
    durations = [5.0, 1.0, 4.0, 2.0, 3.0, 1.5, 0.5]
    batches = list(bucket_by_duration(durations, float, 6.0, buffer_size=4))
    # buffer [5, 1, 4, 2] → [1, 2] (2·2 ≤ 6), [4] (2·4 > 6), tail [5] carried;
    # buffer [5, 3, 1.5, 0.5] → [0.5, 1.5, 3] is over (3·3 = 9): [0.5, 1.5], [3], tail [5] already carried
    assert batches == [[1.0, 2.0], [4.0], [0.5, 1.5], [3.0], [5.0]]


def test_oversized_items_are_emitted_alone_with_a_warning() -> None:
    stats = BucketStats()
    with pytest.warns(UserWarning, match="item 1 lasts 12.00 s"):
        batches = list(bucket_by_duration([1.0, 12.0, 2.0], float, 10.0, stats=stats))
    assert batches == [[1.0, 2.0], [12.0]] and stats.oversized == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_seconds": 0}, "max_seconds"),
        ({"max_seconds": float("inf")}, "max_seconds"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_bucketing_argument_errors(kwargs, match: str) -> None:
    args = {"max_seconds": 10.0} | kwargs
    with pytest.raises(ValueError, match=match):
        list(bucket_by_duration([1.0], float, **args))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, "long", None])
def test_bucketing_rejects_bad_durations(bad) -> None:
    with pytest.raises(ValueError, match="duration of item 1"):
        list(bucket_by_duration([1.0, bad], lambda d: d, 10.0))

