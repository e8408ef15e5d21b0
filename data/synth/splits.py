"""Seeds and split membership shared by every synthetic generator.

Determinism: sample ``i`` of ``(kind, seed, split)`` draws from its own ``random.Random`` whose seed is
a SHA-256 of ``"{kind}/{seed}/{split}/{i}"``. No global RNG, no clock, no process state: the same
arguments give the same sample whatever ``n`` is and in whatever order samples are made.

Disjoint splits: every sample has a *content description* (a canonical string of what the sample says,
e.g. the colours, shapes, sizes and positions of a scene, or the words of a spoken sentence — never
pixel jitter, phrasing or voice). Its SHA-256 falls in one of 100 buckets; buckets 0–79 belong to
``train``, 80–89 to ``val`` and 90–99 to ``test``. A generator redraws until the content belongs to
the requested split, so no two splits ever share a content description (for any seeds).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import TypeVar

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The split names accepted everywhere."""

SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}
"""Which of the 100 content-hash buckets belong to each split (disjoint ranges)."""

MAX_DRAWS = 10_000
"""Redraw limit in `draw_in_split` before it gives up (the content space is too small for the split)."""

T = TypeVar("T")


def check_split(split: str) -> str:
    """Return ``split`` if it is one of `SPLITS`, else raise ``ValueError`` naming the choices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def sample_rng(kind: str, seed: int, split: str, index: int) -> random.Random:
    """The private RNG of one sample: independent of every other sample, of ``n`` and of the clock."""
    check_split(split)
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return random.Random(_digest(f"mm-llama-synth/{kind}/{int(seed)}/{split}/{index}"))


def split_of(description: str) -> str:
    """The split a content description belongs to (a pure function of the description)."""
    bucket = _digest("split/" + description) % 100
    for name, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError(f"bucket {bucket} is in no split")  # unreachable: the ranges cover 0..99


def draw_in_split(
    draw: Callable[[random.Random], T], describe: Callable[[T], str], rng: random.Random, split: str
) -> T:
    """Call ``draw(rng)`` until ``split_of(describe(item)) == split`` and return that item.

    Raises ``RuntimeError`` after `MAX_DRAWS` tries (the generator's content space is too small).
    """
    check_split(split)
    for _ in range(MAX_DRAWS):
        item = draw(rng)
        if split_of(describe(item)) == split:
            return item
    raise RuntimeError(
        f"no content for split {split!r} after {MAX_DRAWS} draws; the generator's content space is too small"
    )


def sample_key(split: str, index: int) -> str:
    """Webdataset key of sample ``index`` (no dots: webdataset splits member names at the first dot)."""
    return f"{check_split(split)}-{index:08d}"
