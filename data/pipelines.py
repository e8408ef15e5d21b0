"""Webdataset pipelines: shards → decoded, transformed, tokenized, collated model batches.

One function per task family, all configured by one :class:`LoaderConfig` and returning a
:class:`Loader` (an iterable of batches with aggregated :class:`~mm_llama.data.loader_stats.LoaderStats`):

================================  =========================  =================================================
function                          tasks                      batch (from :mod:`mm_llama.data.collate`)
================================  =========================  =================================================
:func:`image_text_loader`         ``caption``, ``vqa``       ``ImageTextBatch``: text ``[B, T]``, pixels
                                                             ``[B, 1, max_tiles, 3, tile, tile]`` + masks
:func:`video_text_loader`         ``video_caption``,         ``VideoTextBatch``: text ``[B, T]``, frames
                                  ``video_qa``               ``[B, K, max_tiles, 3, tile, tile]`` + masks
:func:`audio_text_loader`         ``asr``, ``ast``           ``AudioTextBatch``: text ``[B, T]``, log-mel
                                                             ``[B, F_max, 80]`` + lengths, durations
================================  =========================  =================================================

Shard layouts (REFERENCE.md §6; img2dataset and video2dataset output loads as it is):

* image-text ``KEY.{jpg,png,webp,…}`` + ``KEY.txt`` (caption; else ``"caption"`` in ``KEY.json``) + ``KEY.json``
* image QA ``KEY.{jpg,…}`` + ``KEY.json`` with ``question`` and ``answer`` (or a list ``answers``)
* video ``KEY.mp4`` + ``KEY.txt`` / ``KEY.json`` (caption; ``question`` + ``answer`` for video QA)
* audio ``KEY.{flac,wav,…}`` + ``KEY.json`` with ``text``, ``language``, optional ``translation``
  (needed for AST; its language from ``target_language`` in the JSON or the loader argument) and
  ``duration``.

Per worker, a sample goes: shard list (:class:`~mm_llama.data.shard_source.ShardSource`) → webdataset
``tarfile_to_samples`` → seeded shuffle buffer → our decoders (:mod:`mm_llama.data.decoders`; webdataset
decodes nothing) → optional augmentation → image tiles / per-frame tiles / 80-dim log-mel →
``build_example`` (prompt template, labels −100 on prompt, media and padding) → ``batched`` with the
family's collate function (audio: ``bucket_by_duration`` under ``max_batch_seconds``) → the batch,
carried with a stats delta to the main process. ``WebLoader(batch_size=None)`` runs the workers.

Any sample that cannot be used — undecodable media, missing or malformed text/JSON, labels that would
all be −100, a damaged tar — is skipped, logged (rate-limited) with its ``SHARD:KEY`` and counted by
reason; the :class:`Loader` stops with :class:`~mm_llama.data.loader_stats.TooManySkippedError` when the
skipped fraction exceeds ``max_skip_fraction`` (checked once ``min_samples_before_check`` samples were
met, and again at the end of every epoch). A damaged tar counts as one ``tar`` skip plus the samples it is
known to have lost after the damage (``LoaderStats.lost``; "unknown count" when no ``stats.json`` says how
many the shard held). A resampled loader whose shards yield no sample at all (0-byte files, git-lfs
pointers, truncated or non-tar files) stops with
:class:`~mm_llama.data.shard_source.UnreadableShardsError` naming the shards, instead of drawing forever.
Per-sample limits: ``KEY.json`` nested deeper than ``MAX_JSON_DEPTH`` (64) is ``bad_metadata``; an image
declaring more than ``MAX_IMAGE_PIXELS`` (40 MP) and a still image stored as a video member are
``decode_image`` / ``decode_video`` skips.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

from mm_llama.data.collate import (
    AudioTextBatch,
    ImageTextBatch,
    VideoTextBatch,
    collate_audio_only,
    collate_audio_text,
    collate_image_text,
    collate_video_text,
)
from mm_llama.data.loader import Loader, _BatchStream
from mm_llama.data.loader_config import LoaderConfig
from mm_llama.data.loader_stats import TooManySkippedError
from mm_llama.data.sample_processors import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    _AudioProcessor,
    _ImageProcessor,
    _VideoProcessor,
    check_prompt_for,
    check_question_types,
)
from mm_llama.data.shard_source import UnreadableShardsError, expand_shards, node_info
from mm_llama.data.tasks import task_names
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer

__all__ = [
    "AUDIO_EXTENSIONS",
    "AUDIO_TASKS",
    "SPEECH_PRETRAIN_TASKS",
    "IMAGE_EXTENSIONS",
    "IMAGE_TASKS",
    "VIDEO_EXTENSIONS",
    "VIDEO_TASKS",
    "Loader",
    "LoaderConfig",
    "TooManySkippedError",
    "UnreadableShardsError",
    "audio_text_loader",
    "image_text_loader",
    "loader_for_task",
    "video_text_loader",
]

IMAGE_TASKS = task_names("image_text")
"""``caption_vqa`` mixes both: a record whose KEY.json has a ``question`` is a VQA sample, any other a
caption sample, so image-caption and image-qa shards listed together train one adapter on both."""
VIDEO_TASKS = task_names("video_text")
AUDIO_TASKS = task_names("audio_text")
SPEECH_PRETRAIN_TASKS = task_names("speech_pretrain")
"""Audio only, no text (``best_rq``): batches are `AudioBatch`, no tokenizer needed."""




# --------------------------------------------------------------------------------------------------
# public constructors


def _tokenizer(tokenizer: Tokenizer | str | os.PathLike[str]) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_path(tokenizer)
    raise ValueError(f"tokenizer must be a Tokenizer or a path, got {type(tokenizer).__name__}")


def _setup(config: LoaderConfig, tokenizer: Tokenizer | str | os.PathLike[str] | None, media: MediaTokens | None
           ) -> tuple[list[str], Tokenizer | None, MediaTokens, int]:
    """Shard list, tokenizer, media ids and pad id of a loader (`tokenizer` None: a loader without text,
    whose `media` is given)."""
    if not isinstance(config, LoaderConfig):
        raise ValueError(f"config must be a LoaderConfig, got {type(config).__name__}")
    urls = expand_shards(config.shards)
    tok = _tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None:
        media = media if media is not None else MediaTokens(tok.vocab_size)
        media.check_tokenizer(tok)
    assert media is not None
    _, world_size = node_info(config.rank, config.world_size)
    if not config.resampled and len(urls) < world_size * max(config.num_workers, 1):
        warnings.warn(
            f"{len(urls)} shard(s) for {world_size} rank(s) × {max(config.num_workers, 1)} worker(s): "
            "some workers get no shards and ranks may see different numbers of batches; write more, smaller "
            "shards or use resampled=True with samples_per_epoch",
            stacklevel=3,
        )
    pad_id = 0 if tok is None else tok.pad_id if tok.pad_id is not None else tok.eot_id
    return urls, tok, media, pad_id


def image_text_loader(
    config: LoaderConfig,
    tokenizer: Tokenizer | str | os.PathLike[str],
    *,
    task: str = "caption",
    prompt: str | None = None,
    media: MediaTokens | None = None,
    question_types: Iterable[str] | None = None,
) -> Loader[ImageTextBatch]:
    """Image-text batches for `task` ``"caption"`` (caption from ``KEY.txt`` or ``caption`` in
    ``KEY.json``), ``"vqa"`` (``question`` / ``answer`` in ``KEY.json``) or ``"caption_vqa"`` (per record:
    vqa when its KEY.json has a ``question``, else caption).

    Each sample's image becomes `config.max_tiles`-bounded tiles of `config.tile_size` (Llama 3.2 Vision
    tiling) and its text one ``<|image|>`` prompt in the Llama 3 chat format (`prompt` overrides the
    caption instruction; for ``vqa`` it is a wording with a ``{question}`` slot). Batches are `ImageTextBatch`: ``text.input_ids / labels / attention_mask
    [B, T]``, ``images.pixels [B, 1, max_tiles, 3, tile, tile]``, ``aspect_ratio_ids [B, 1]``,
    ``tile_mask [B, 1, max_tiles]``. `media` defaults to ``MediaTokens(tokenizer.vocab_size)``.
    `question_types` keeps only records whose KEY.json ``type`` is one of them (`check_question_types`).
    """
    if task not in IMAGE_TASKS:
        raise ValueError(f"image_text_loader task must be one of {IMAGE_TASKS}, got {task!r}")
    urls, tok, media, pad_id = _setup(config, tokenizer, media)
    check_prompt_for(task, prompt)
    processor = _ImageProcessor(task, tok, media, config, check_question_types(question_types), prompt=prompt)
    stream = _BatchStream(urls, config, processor, collate_image_text,
                          {"pad_id": pad_id, "max_tiles": config.max_tiles, "tile_size": config.tile_size})
    return Loader(stream, task)


def video_text_loader(
    config: LoaderConfig,
    tokenizer: Tokenizer | str | os.PathLike[str],
    *,
    task: str = "video_caption",
    num_frames: int = 8,
    prompt: str | None = None,
    media: MediaTokens | None = None,
    question_types: Iterable[str] | None = None,
) -> Loader[VideoTextBatch]:
    """Video-text batches for `task` ``"video_caption"`` or ``"video_qa"``.

    Each clip is decoded to `num_frames` (K) frames spread uniformly over the whole clip, each frame
    tiled like an image (`prompt`: the caption instruction, or for ``video_qa`` a wording with a
    ``{question}`` slot). Batches are `VideoTextBatch`: text ``[B, T]``, ``frames.pixels
    [B, K, max_tiles, 3, tile, tile]`` with ``frames.tile_mask [B, K, max_tiles]`` and ``frame_mask
    [B, K]``. `question_types` as for `image_text_loader`.
    """
    if task not in VIDEO_TASKS:
        raise ValueError(f"video_text_loader task must be one of {VIDEO_TASKS}, got {task!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    urls, tok, media, pad_id = _setup(config, tokenizer, media)
    check_prompt_for(task, prompt)
    processor = _VideoProcessor(task, tok, media, config, check_question_types(question_types),
                                num_frames=num_frames, prompt=prompt)
    stream = _BatchStream(urls, config, processor, collate_video_text,
                          {"pad_id": pad_id, "max_tiles": config.max_tiles, "tile_size": config.tile_size})
    return Loader(stream, task)


def audio_text_loader(
    config: LoaderConfig,
    tokenizer: Tokenizer | str | os.PathLike[str],
    *,
    task: str = "asr",
    max_batch_seconds: float = 120.0,
    target_language: str | None = "English",
    default_language: str | None = None,
    bucket_buffer: int = 64,
    media: MediaTokens | None = None,
) -> Loader[AudioTextBatch]:
    """Speech-text batches for `task` ``"asr"`` (``text`` + ``language`` from ``KEY.json``) or ``"ast"``
    (``translation`` into ``target_language`` from ``KEY.json``, else the `target_language` argument;
    samples without a translation are skipped as ``no_translation``).

    Audio is decoded to 16 kHz mono and turned into 80-dim log-mel frames (``log_mel``, 100 per second).
    Batches come from ``bucket_by_duration``: utterances of similar length, at most
    `config.batch_size` per batch, padded duration (rows × longest) ≤ `max_batch_seconds`; an utterance
    longer than the budget on its own is skipped (``too_long``). `default_language` fills a missing
    ``language`` for ASR. Batches are `AudioTextBatch`: text ``[B, T]``, ``features [B, F_max, 80]``,
    ``feature_lengths [B]``, ``durations [B]`` seconds.
    """
    if task not in AUDIO_TASKS + SPEECH_PRETRAIN_TASKS:
        raise ValueError(f"audio_text_loader task must be one of {AUDIO_TASKS + SPEECH_PRETRAIN_TASKS}, got {task!r}")
    if isinstance(max_batch_seconds, bool) or not isinstance(max_batch_seconds, (int, float)) or not max_batch_seconds > 0:
        raise ValueError(f"max_batch_seconds must be a number > 0, got {max_batch_seconds!r}")
    if isinstance(bucket_buffer, bool) or not isinstance(bucket_buffer, int) or bucket_buffer < 1:
        raise ValueError(f"bucket_buffer must be a positive integer, got {bucket_buffer!r}")
    if task in SPEECH_PRETRAIN_TASKS:  # the audio alone: no prompt, no tokenizer
        urls, tok, media, pad_id = _setup(config, None, media or MediaTokens(0))
        collate, collate_kwargs = collate_audio_only, {}
    else:
        urls, tok, media, pad_id = _setup(config, tokenizer, media)
        collate, collate_kwargs = collate_audio_text, {"pad_id": pad_id}
    processor = _AudioProcessor(task, tok, media, config,
                                max_batch_seconds=float(max_batch_seconds), target_language=target_language,
                                default_language=default_language)
    stream = _BatchStream(urls, config, processor, collate, collate_kwargs,
                          bucket_seconds=float(max_batch_seconds), bucket_buffer=bucket_buffer)
    return Loader(stream, task)


def loader_for_task(
    task: str, config: LoaderConfig, tokenizer: Tokenizer | str | os.PathLike[str], **options: Any
) -> Loader[Any]:
    """The family's loader for `task` (caption, vqa, caption_vqa, video_caption, video_qa, asr, ast);
    `options` go to that family's function (e.g. ``num_frames=``, ``max_batch_seconds=``, ``prompt=``)."""
    if task in IMAGE_TASKS:
        return image_text_loader(config, tokenizer, task=task, **options)
    if task in VIDEO_TASKS:
        return video_text_loader(config, tokenizer, task=task, **options)
    if task in AUDIO_TASKS + SPEECH_PRETRAIN_TASKS:
        return audio_text_loader(config, tokenizer, task=task, **options)
    raise ValueError(f"unknown task {task!r}; expected one of {IMAGE_TASKS + VIDEO_TASKS + AUDIO_TASKS + SPEECH_PRETRAIN_TASKS}")
