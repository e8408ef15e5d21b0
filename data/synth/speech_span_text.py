"""ASR exchanges in text whose user turn is laid out in time the way a speech span is.

The speech adapter turns 80 ms of audio into one LM input embedding, so an utterance reaches the frozen LM
as a span of about 6 embeddings per word (`speech_token_count`), most of them between words. A frozen LM
that has only read text has never copied a transcript out of such a span, and a tiny one does not learn to
from the weak gradient of the speech stage (stop 30's measurements). This module writes the same exchange
in text: the transcript's pre-tokens (Llama 3's pattern, so each re-encodes to exactly the tokens of the
answer), each inside a block of `FILLER` tokens as long as the audio of a word, with silence at both ends::

    F F There F F F F F is F F F a F F F F ... F circle F F . F F      →   There is a ... circle.

A speech model trained with the CTC aid (`mm_llama.train.speech_ctc`), whose blank is the same `FILLER`, gives the LM
spans of this form: word embeddings where the words are heard and the filler's embedding elsewhere.
"""

from __future__ import annotations

import random

import regex

from mm_llama.tokenizer import LLAMA3_PATTERN

__all__ = ["FILLER", "PAD_BLOCK", "PUNCTUATION_BLOCK", "WORD_BLOCK", "stretch_transcript"]

FILLER = "<|reserved_special_token_10|>"
"""The special token that stands for "no new word here" (the CTC blank of the speech stage)."""
WORD_BLOCK = (4, 9)
"""Span positions per spoken pre-token (inclusive range): the demo's espeak-ng speech gives 4.1-12.3 adapter
outputs per pre-token, 6.5 on average, punctuation included."""
PUNCTUATION_BLOCK = (1, 3)
"""Span positions per punctuation pre-token (not spoken: a pause at most)."""
PAD_BLOCK = (1, 4)
"""Filler positions before the first and after the last pre-token (the 0.1-0.3 s of silence around a clip)."""

_PATTERN = regex.compile(LLAMA3_PATTERN)


def _block(piece: str, rng: random.Random) -> list[str]:
    """``piece`` at a random place inside a block of fillers whose length suits its kind."""
    low, high = WORD_BLOCK if any(c.isalnum() for c in piece) else PUNCTUATION_BLOCK
    size = rng.randint(low, high)
    at = rng.randrange(size)
    return [FILLER] * at + [piece] + [FILLER] * (size - at - 1)


def stretch_transcript(text: str, rng: random.Random, *, length: int | None = None) -> str:
    """``text`` as a stretched span (see the module docstring): special-token text with ``allow_special``.

    Every pre-token of ``text`` appears once, in order, so removing `FILLER` gives ``text`` back (after
    ``strip()``); an empty ``text`` gives fillers only. ``length``: the span's positions at least (more
    fillers at the end), as a long clip of silence labelled "." spans many adapter outputs."""
    pieces = _PATTERN.findall(text.strip())
    out = [FILLER] * rng.randint(*PAD_BLOCK)
    for piece in pieces:
        out += _block(piece, rng)
    out += [FILLER] * max(rng.randint(*PAD_BLOCK), (length or 0) - len(out))
    return "".join(out)
