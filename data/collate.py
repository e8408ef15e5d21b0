"""Collation of tokenized examples with their media into padded model batches, and duration bucketing.

* :func:`collate_text` — right-pads ``Example`` ids with ``pad_id`` and labels with −100.
* :func:`collate_image_text` / :func:`collate_video_text` / :func:`collate_audio_text` — the same plus
  the sample's media, after checking that each example holds exactly as many media tokens as media
  it is paired with (a mismatch would silently misalign media and text in the model).
* :func:`bucket_by_duration` — groups audio samples into batches under a padded total-seconds budget.

Media token ids are read from each ``Example.media`` (set by :func:`~mm_llama.data.prompts.build_example`)
or from the ``media=`` argument, which takes precedence.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from mm_llama.data.image_transform import ImageBatch, TiledImage, collate_images
from mm_llama.data.prompts import IGNORE_INDEX, Example, speech_token_count
from mm_llama.encoders.audio_features import FRAMES_PER_SECOND, N_MELS
from mm_llama.media_tokens import MediaTokens

__all__ = [
    "AudioBatch",
    "AudioTextBatch",
    "BucketStats",
    "ImageTextBatch",
    "TextBatch",
    "VideoTextBatch",
    "bucket_by_duration",
    "collate_audio",
    "collate_audio_only",
    "collate_audio_text",
    "collate_image_text",
    "collate_text",
    "collate_video_text",
]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# text


@dataclass
class TextBatch:
    """Right-padded token batch.

    input_ids: ``[B, T]`` long, padded with ``pad_id``.
    labels: ``[B, T]`` long, −100 on prompt, media and padding positions (aligned with input_ids).
    attention_mask: ``[B, T]`` bool, True on real tokens, False on padding.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    @property
    def lengths(self) -> Tensor:
        """``[B]`` long: the unpadded length of each row."""
        return self.attention_mask.sum(dim=1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextBatch:
        """A copy on ``device``."""
        return TextBatch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
        )


def collate_text(examples: Sequence[Example], pad_id: int, *, pad_to_multiple: int | None = None) -> TextBatch:
    """Stack ``B`` examples into a :class:`TextBatch` of length ``T`` = the longest example, rounded up
    to a multiple of ``pad_to_multiple`` when given (fixed shapes help kernels and compilation)."""
    if len(examples) == 0:
        raise ValueError("collate_text needs at least one example, got an empty list")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(
            f"pad_id must be a non-negative token id, got {pad_id!r} (tokenizer.pad_id is None for Llama 3.0 "
            "vocabularies: pass eot_id or any id; padding is masked out of attention and labels)"
        )
    if pad_to_multiple is not None and (
        isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1
    ):
        raise ValueError(f"pad_to_multiple must be a positive int or None, got {pad_to_multiple!r}")
    for b, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise ValueError(f"example {b} is a {type(ex).__name__}, expected a prompts.Example")
        if len(ex.input_ids) != len(ex.labels):
            raise ValueError(f"example {b}: {len(ex.input_ids)} input ids but {len(ex.labels)} labels")
        if len(ex.input_ids) == 0:
            raise ValueError(f"example {b} is empty (no tokens)")
    length = max(len(ex.input_ids) for ex in examples)
    if pad_to_multiple is not None:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.bool)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[b, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[b, :n] = True
    return TextBatch(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def _split_pairs(pairs: Sequence[tuple[Example, object]], where: str) -> tuple[list[Example], list]:
    """``[(example, media), ...]`` → ``([example, ...], [media, ...])`` with a clear error on bad input."""
    if len(pairs) == 0:
        raise ValueError(f"{where} needs at least one (example, media) pair, got an empty list")
    examples, media = [], []
    for b, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], Example):
            raise ValueError(f"{where}: pair {b} must be an (Example, media) tuple, got {type(pair).__name__}")
        examples.append(pair[0])
        media.append(pair[1])
    return examples, media


def _media_for(example: Example, media: MediaTokens | None, b: int) -> MediaTokens:
    """The media ids to count in ``example``: the explicit ``media`` argument, else the example's own."""
    found = media if media is not None else example.media
    if found is None:
        raise ValueError(
            f"pair {b}: the example does not record its media token ids (built by hand?); pass media=MediaTokens(...)"
        )
    return found


def _task(example: Example) -> str:
    return f" (task {example.task!r})" if example.task else ""


# --------------------------------------------------------------------------------------------------
# images and video


@dataclass
class ImageTextBatch:
    """Text with its images: ``images.pixels`` is ``[B, N, T_tiles, 3, tile, tile]``; image ``j`` of row
    ``b`` belongs to the ``j``-th ``<|image|>`` token of that row."""

    text: TextBatch
    images: ImageBatch

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> ImageTextBatch:
        """A copy on ``device``; ``dtype`` applies to the pixels only."""
        return ImageTextBatch(self.text.to(device, non_blocking), self.images.to(device, dtype, non_blocking))


@dataclass
class VideoTextBatch:
    """Text with one video clip per row.

    frames: an ``ImageBatch`` whose N axis is frames: ``pixels [B, K, T_tiles, 3, tile, tile]``
        (K = most frames in the batch, or ``max_frames``).
    frame_mask: ``[B, K]`` bool, True on real frames, False on padding frames.
    """

    text: TextBatch
    frames: ImageBatch
    frame_mask: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> VideoTextBatch:
        """A copy on ``device``; ``dtype`` applies to the pixels only."""
        return VideoTextBatch(
            self.text.to(device, non_blocking),
            self.frames.to(device, dtype, non_blocking),
            self.frame_mask.to(device, non_blocking=non_blocking),
        )


def collate_image_text(
    pairs: Sequence[tuple[Example, Sequence[TiledImage]]],
    pad_id: int,
    max_tiles: int,
    tile_size: int,
    *,
    media: MediaTokens | None = None,
    max_images: int | None = None,
    pad_to_multiple: int | None = None,
) -> ImageTextBatch:
    """Collate ``(example, images)`` pairs; each example must hold one ``<|image|>`` id per image.

    ``tile_size`` is required so that batches without any image still have a pixel shape; ``max_images``
    fixes N (see :func:`~mm_llama.data.image_transform.collate_images`).
    """
    examples, images = _split_pairs(pairs, "collate_image_text")
    for b, (ex, ims) in enumerate(zip(examples, images)):
        if isinstance(ims, TiledImage) or not isinstance(ims, Sequence):
            raise ValueError(f"pair {b}: images must be a list of TiledImage, got {type(ims).__name__}")
        image_id = _media_for(ex, media, b).image
        count = ex.input_ids.count(image_id)
        if count != len(ims):
            raise ValueError(
                f"pair {b}{_task(ex)}: the example has {count} <|image|> token(s) (id {image_id}) but is paired with "
                f"{len(ims)} image(s); each image needs exactly one <|image|> token in its text"
            )
    text = collate_text(examples, pad_id, pad_to_multiple=pad_to_multiple)
    batch = collate_images([list(ims) for ims in images], max_tiles, max_images=max_images, tile_size=tile_size)
    return ImageTextBatch(text=text, images=batch)


def collate_video_text(
    pairs: Sequence[tuple[Example, Sequence[TiledImage]]],
    pad_id: int,
    max_tiles: int,
    tile_size: int,
    *,
    media: MediaTokens | None = None,
    max_frames: int | None = None,
    pad_to_multiple: int | None = None,
) -> VideoTextBatch:
    """Collate ``(example, clip)`` pairs, a clip being its K frames (each a tiled image, K ≥ 1).

    Each example must hold exactly one ``<|video|>`` id. Clips with fewer frames than the longest (or
    than ``max_frames``) are padded with empty frames, marked False in ``frame_mask``.
    """
    examples, clips = _split_pairs(pairs, "collate_video_text")
    for b, (ex, clip) in enumerate(zip(examples, clips)):
        if isinstance(clip, TiledImage) or not isinstance(clip, Sequence):
            raise ValueError(f"pair {b}: a clip must be a list of per-frame TiledImage, got {type(clip).__name__}")
        if len(clip) == 0:
            raise ValueError(f"pair {b}{_task(ex)}: the clip has no frames")
        video_id = _media_for(ex, media, b).video
        count = ex.input_ids.count(video_id)
        if count != 1:
            raise ValueError(
                f"pair {b}{_task(ex)}: the example has {count} <|video|> token(s) (id {video_id}); a video "
                "example needs exactly one, for its one clip"
            )
    text = collate_text(examples, pad_id, pad_to_multiple=pad_to_multiple)
    frames = collate_images([list(c) for c in clips], max_tiles, max_images=max_frames, tile_size=tile_size)
    return VideoTextBatch(text=text, frames=frames, frame_mask=frames.image_mask)


# --------------------------------------------------------------------------------------------------
# audio


@dataclass
class AudioTextBatch:
    """Text with one utterance per row.

    features: ``[B, F_max, 80]`` log-mel frames, zero-padded at the end.
    feature_lengths: ``[B]`` long, real frames per row.
    durations: ``[B]`` float32 seconds of audio (``feature_lengths / 100``).
    """

    text: TextBatch
    features: Tensor
    feature_lengths: Tensor
    durations: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> AudioTextBatch:
        """A copy on ``device``; ``dtype`` (floating) applies to the features only."""
        return AudioTextBatch(self.text.to(device, non_blocking), *_audio_to(self, device, dtype, non_blocking))


@dataclass
class AudioBatch:
    """Utterances without text (speech-encoder pretraining).

    features: ``[B, F_max, 80]`` log-mel frames, zero-padded at the end.
    feature_lengths: ``[B]`` long, real frames per row.
    durations: ``[B]`` float32 seconds of audio (``feature_lengths / 100``).
    """

    features: Tensor
    feature_lengths: Tensor
    durations: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> AudioBatch:
        """A copy on ``device``; ``dtype`` (floating) applies to the features only."""
        return AudioBatch(*_audio_to(self, device, dtype, non_blocking))


def _audio_to(batch: AudioBatch | AudioTextBatch, device: torch.device | str, dtype: torch.dtype | None,
              non_blocking: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(features, feature_lengths, durations)`` of ``batch`` on ``device``, the features in ``dtype``."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype applies to the features and must be a floating type, got {dtype}")
    return (batch.features.to(device=device, dtype=dtype, non_blocking=non_blocking),
            batch.feature_lengths.to(device, non_blocking=non_blocking),
            batch.durations.to(device, non_blocking=non_blocking))


def collate_audio_only(pairs: Sequence[tuple[None, Tensor]]) -> AudioBatch:
    """Collate ``(None, features [F, 80])`` pairs (no text) into an :class:`AudioBatch`."""
    features, lengths = collate_audio([f for _, f in pairs])
    return AudioBatch(features, lengths, lengths.float() / FRAMES_PER_SECOND)


def collate_audio(features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad per-utterance features ``[F_i, 80]`` into ``([B, F_max, 80]`` zero-padded, lengths ``[B]`` long).

    All utterances must share the feature size and floating dtype; each needs at least one frame.
    """
    if len(features) == 0:
        raise ValueError("collate_audio needs at least one utterance, got an empty list")
    first = features[0]
    for b, f in enumerate(features):
        if not isinstance(f, Tensor) or f.dim() != 2:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"utterance {b}: features must be a [frames, {N_MELS}] tensor, got {shape}")
        if f.shape[1] != first.shape[1]:
            raise ValueError(
                f"utterance {b} has {f.shape[1]} features per frame but utterance 0 has {first.shape[1]}; "
                "compute all features with the same log_mel"
            )
        if not f.is_floating_point() or f.dtype != first.dtype:
            raise ValueError(f"utterance {b} has dtype {f.dtype}, expected floating {first.dtype} like utterance 0")
        if f.shape[0] == 0:
            raise ValueError(f"utterance {b} has no frames (audio shorter than one 25 ms window); drop it")
    lengths = torch.tensor([int(f.shape[0]) for f in features], dtype=torch.long)
    out = first.new_zeros((len(features), int(lengths.max()), first.shape[1]))
    for b, f in enumerate(features):
        out[b, : f.shape[0]] = f
    return out, lengths


def collate_audio_text(
    pairs: Sequence[tuple[Example, Tensor]],
    pad_id: int,
    *,
    media: MediaTokens | None = None,
    pad_to_multiple: int | None = None,
) -> AudioTextBatch:
    """Collate ``(example, features [F, 80])`` pairs.

    Each example must hold exactly ``speech_token_count(F)`` speech placeholder ids, inside one
    ``speech_start`` … ``speech_end`` span, so that the adapter outputs fill the span exactly.
    """
    examples, feats = _split_pairs(pairs, "collate_audio_text")
    features, lengths = collate_audio(feats)
    for b, ex in enumerate(examples):
        ids = _media_for(ex, media, b)
        n_frames = int(lengths[b])
        want = speech_token_count(n_frames)
        have = ex.input_ids.count(ids.speech)
        starts, ends = ex.input_ids.count(ids.speech_start), ex.input_ids.count(ids.speech_end)
        if starts != 1 or ends != 1:
            raise ValueError(
                f"pair {b}{_task(ex)}: expected one speech span, found {starts} speech_start and {ends} speech_end "
                "token(s)"
            )
        if have != want:
            raise ValueError(
                f"pair {b}{_task(ex)}: the example has {have} speech placeholder token(s) but its {n_frames} feature "
                f"frames give speech_token_count({n_frames}) = {want}; build the example with "
                "n_speech_tokens=speech_token_count(features.shape[0])"
            )
    text = collate_text(examples, pad_id, pad_to_multiple=pad_to_multiple)
    durations = lengths.to(torch.float32) / FRAMES_PER_SECOND
    return AudioTextBatch(text=text, features=features, feature_lengths=lengths, durations=durations)


# --------------------------------------------------------------------------------------------------
# duration bucketing


@dataclass
class BucketStats:
    """Counters that :func:`bucket_by_duration` updates as it runs."""

    items: int = 0
    batches: int = 0
    oversized: int = 0


def bucket_by_duration(
    items: Iterable[T],
    duration: Callable[[T], float],
    max_seconds: float,
    *,
    buffer_size: int = 64,
    max_batch: int | None = None,
    stats: BucketStats | None = None,
) -> Iterator[list[T]]:
    """Group items into batches whose PADDED duration ``len(batch) × longest item`` is ≤ ``max_seconds``.

    Reads ``buffer_size`` items, sorts them by duration (ties keep input order) and cuts the sorted run
    greedily into batches (at most ``max_batch`` items each when given). The last, unfilled batch of a
    buffer is carried into the next buffer once, to be filled with new items; at the end of the input
    everything left is flushed. Every item is emitted exactly once and the result depends only on the
    input order (deterministic; shuffle batches downstream if needed).

    An item longer than ``max_seconds`` on its own is emitted alone, with a warning, and counted in
    ``stats.oversized`` — never dropped silently. ``duration`` must return a finite number ≥ 0.
    """
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not (
        math.isfinite(max_seconds) and max_seconds > 0
    ):
        raise ValueError(f"max_seconds must be a finite number > 0, got {max_seconds!r}")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
    stats = stats if stats is not None else BucketStats()
    # buffer entries: (duration, input index, item, carried before)
    buffer: list[tuple[float, int, T, bool]] = []

    def cut(entries: list[tuple[float, int, T, bool]]) -> list[list[tuple[float, int, T, bool]]]:
        entries.sort(key=lambda e: (e[0], e[1]))
        batches: list[list[tuple[float, int, T, bool]]] = []
        current: list[tuple[float, int, T, bool]] = []
        for entry in entries:
            d = entry[0]
            if d > max_seconds:  # sorted: only the tail can be oversized; each goes alone
                if current:
                    batches.append(current)
                    current = []
                stats.oversized += 1
                warnings.warn(
                    f"bucket_by_duration: item {entry[1]} lasts {d:.2f} s, more than max_seconds={max_seconds}; "
                    "emitting it as a batch of its own (crop or filter long samples, or raise the budget)",
                    stacklevel=3,
                )
                batches.append([entry])
                continue
            full = max_batch is not None and len(current) >= max_batch
            if current and (full or (len(current) + 1) * d > max_seconds):
                batches.append(current)
                current = []
            current.append(entry)
        if current:
            batches.append(current)
        return batches

    def emit(batch: list[tuple[float, int, T, bool]]) -> list[T]:
        stats.batches += 1
        return [e[2] for e in batch]

    for index, item in enumerate(items):
        d = _checked_duration(duration(item), index)
        stats.items += 1
        buffer.append((d, index, item, False))
        if len(buffer) < buffer_size:
            continue
        batches = cut(buffer)
        last = batches[-1]
        # carry the unfilled tail batch once; never an oversized item (nothing can join it) or a full batch
        carry = (
            last[0][0] <= max_seconds
            and not any(e[3] for e in last)
            and not (max_batch is not None and len(last) >= max_batch)
        )
        if carry:
            batches.pop()
        for batch in batches:
            yield emit(batch)
        buffer = [(e[0], e[1], e[2], True) for e in last] if carry else []
    if buffer:
        for batch in cut(buffer):
            yield emit(batch)


def _checked_duration(value: object, index: int) -> float:
    bad = isinstance(value, bool)
    try:
        d = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        bad = True
    if bad or not math.isfinite(d) or d < 0:
        raise ValueError(f"bucket_by_duration: duration of item {index} is {value!r}; expected a finite number >= 0")
    return d
