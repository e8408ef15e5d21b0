"""Seeding and split membership: independent per-sample RNGs, disjoint content across splits."""

from __future__ import annotations

import pytest

from mm_llama.data.synth.moving_shapes import make_moving_shapes_sample
from mm_llama.data.synth.shapes import make_shapes_sample
from mm_llama.data.synth.speech import _describe, random_utterance
from mm_llama.data.synth.splits import SPLIT_BUCKETS, draw_in_split, sample_rng, split_of
from mm_llama.data.synth.text import make_text_sample


def test_buckets_partition_0_to_99() -> None:
    seen = [b for r in SPLIT_BUCKETS.values() for b in r]
    assert sorted(seen) == list(range(100))


def test_sample_rng_is_independent_of_order_and_seeded() -> None:
    a = [sample_rng("shapes", 7, "train", i).random() for i in range(5)]
    b = [sample_rng("shapes", 7, "train", i).random() for i in reversed(range(5))][::-1]
    assert a == b
    assert sample_rng("shapes", 8, "train", 0).random() != a[0]
    assert sample_rng("shapes", 7, "val", 0).random() != a[0]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sample_rng("shapes", 0, "dev", 0)


def test_shapes_and_clips_splits_are_disjoint() -> None:
    counts = {"train": 120, "val": 40, "test": 40}
    scenes = {s: {make_shapes_sample(0, s, i).scene.description() for i in range(n)} for s, n in counts.items()}
    clips = {s: {make_moving_shapes_sample(0, s, i, codec="mpeg4").clip.description() for i in range(n // 4)}
             for s, n in counts.items()}
    texts = {s: {make_text_sample(0, s, i).content.description() for i in range(n)} for s, n in counts.items()}
    for family in (scenes, clips, texts):
        for s, descs in family.items():
            assert all(split_of(d) == s for d in descs)
        assert not family["train"] & family["val"]
        assert not family["train"] & family["test"]
        assert not family["val"] & family["test"]
    # other seeds draw other samples but never cross the split boundary either
    other = {make_shapes_sample(1, "test", i).scene.description() for i in range(40)}
    assert not other & scenes["train"]


def test_speech_texts_are_disjoint() -> None:
    texts = {}
    for split, n in (("train", 300), ("val", 60), ("test", 60)):
        texts[split] = {_describe(draw_in_split(random_utterance, _describe, sample_rng("speech", 0, split, i), split))
                        for i in range(n)}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"] and not texts["val"] & texts["test"]


def test_draw_in_split_gives_up_on_a_tiny_space() -> None:
    import random

    fixed = "scene:large red circle left"
    other = next(s for s in SPLIT_BUCKETS if s != split_of(fixed))
    with pytest.raises(RuntimeError, match="too small"):  # a single description never lands in another split
        draw_in_split(lambda rng: fixed, lambda x: x, random.Random(0), other)
    assert draw_in_split(lambda rng: fixed, lambda x: x, random.Random(0), split_of(fixed)) == fixed
