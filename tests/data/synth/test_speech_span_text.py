"""Stretched ASR exchanges: the transcript's pre-tokens in order inside filler blocks as long as a speech span
gives a word, and the stretched text re-encodes to exactly the answer's tokens with fillers between."""

from __future__ import annotations

import random

import pytest

from mm_llama.data.synth.speech import speech_transcript
from mm_llama.data.synth.speech_span_text import FILLER, PAD_BLOCK, PUNCTUATION_BLOCK, WORD_BLOCK, stretch_transcript
from tests.data.test_pipelines import tokenizer

TEXT = "There are two shapes: a blue star on the right and a yellow triangle at the top."


def _blocks(stretched: str) -> list[str]:
    """The non-filler pieces with their filler runs: ["F", "F", "There", "F", ...] split on FILLER."""
    return stretched.replace(FILLER, "\0F\0").split("\0")


def test_removing_the_fillers_gives_the_transcript_back() -> None:
    rng = random.Random(0)
    for index in range(50):
        text = speech_transcript(0, "train", index)
        assert stretch_transcript(text, rng).replace(FILLER, "") == text


def test_block_lengths_follow_the_speech_span() -> None:
    rng = random.Random(1)
    stretched = stretch_transcript(TEXT, rng)
    pieces = [p for p in _blocks(stretched) if p]
    words = [p for p in pieces if p != "F"]
    assert words == ["There", " are", " two", " shapes", ":", " a", " blue", " star", " on", " the", " right", " and",
                     " a", " yellow", " triangle", " at", " the", " top", "."]
    n_words = sum(any(c.isalnum() for c in w) for w in words)
    low = 2 * PAD_BLOCK[0] + n_words * WORD_BLOCK[0] + (len(words) - n_words) * PUNCTUATION_BLOCK[0]
    high = 2 * PAD_BLOCK[1] + n_words * WORD_BLOCK[1] + (len(words) - n_words) * PUNCTUATION_BLOCK[1]
    assert low <= len(pieces) <= high
    assert pieces[0] == "F" and pieces[-1] == "F"  # silence before and after


def test_silence_is_fillers_only_and_the_layout_is_seeded() -> None:
    assert set(_blocks(stretch_transcript("", random.Random(2)))) <= {"", "F"}
    long = [p for p in _blocks(stretch_transcript(".", random.Random(2), length=60)) if p]
    assert len(long) == 60 and long.count(".") == 1  # a long silent clip: fillers up to the span's length
    assert len([p for p in _blocks(stretch_transcript(TEXT, random.Random(2), length=5)) if p]) > 5  # at least
    assert stretch_transcript(TEXT, random.Random(3)) == stretch_transcript(TEXT, random.Random(3))
    assert stretch_transcript(TEXT, random.Random(3)) != stretch_transcript(TEXT, random.Random(4))


@pytest.mark.parametrize("text", [TEXT, "zero five five two nine", "Is there a red diamond?", "."])
def test_the_stretched_turn_encodes_to_the_answer_tokens_with_fillers_between(text: str) -> None:
    tok = tokenizer()
    filler = tok.special_tokens[FILLER]
    ids = tok.encode(stretch_transcript(text, random.Random(5)), allow_special=True)
    assert [i for i in ids if i != filler] == tok.encode(text)
    assert ids.count(filler) >= 2 * PAD_BLOCK[0]
