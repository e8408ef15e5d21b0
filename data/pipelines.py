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
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import Any, Generic, TypeVar

import torch
import webdataset as wds
from torchvision.transforms.v2 import functional as tvF

from mm_llama.data.collate import (
    AudioTextBatch,
    ImageTextBatch,
    VideoTextBatch,
    bucket_by_duration,
    collate_audio_text,
    collate_image_text,
    collate_video_text,
)
from mm_llama.data.decoders import decode_audio, decode_image, decode_video
from mm_llama.data.image_transform import ImageTransform, TiledImage
from mm_llama.data.json_limits import JSONLimitError, loads_limited
from mm_llama.data.loader_stats import LoaderStats, StatsRecorder, TooManySkippedError
from mm_llama.data.prompts import EmptyLabelsError, Example, build_example, speech_token_count
from mm_llama.data.records import RecordError
from mm_llama.data.shard_source import (
    ShardSource,
    UnreadableShardsError,
    expand_shards,
    mix_seed,
    node_info,
    samples_per_worker,
    tar_samples,
    worker_info,
)
from mm_llama.data.tasks import get_task, task_names
from mm_llama.encoders.audio_features import FRAMES_PER_SECOND, SAMPLE_RATE, log_mel
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer

__all__ = [
    "AUDIO_EXTENSIONS",
    "AUDIO_TASKS",
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

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus")

B = TypeVar("B")


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class LoaderConfig:
    """Settings shared by every pipeline family.

    shards: shard paths / brace patterns / directories / globs (see `expand_shards`).
    batch_size: samples per batch, per rank (audio: the most per batch; the seconds budget decides).
    num_workers: DataLoader worker processes (0 = load in the calling process).
    resampled: draw shards with replacement, endlessly, instead of explicit epochs; bound an epoch
        with `samples_per_epoch`.
    seed, epoch: seeds of shard order, resampling and the shuffle buffer; `epoch` is the first epoch
        (each iteration of the `Loader` advances it; `Loader.set_epoch` sets it).
    samples_per_epoch: if set, each epoch yields exactly this many samples on this rank (split over its
        workers), repeating or cutting the shards as needed (webdataset `with_epoch`).
    shuffle: shuffle the shard list and the samples (False for evaluation: shards in order).
    shuffle_buffer: samples held in each worker's shuffle buffer (≤ 1: no sample shuffling).
    rank, world_size: this node's place (both None: torch.distributed's when the loader is built, else
        the RANK/WORLD_SIZE environment variables, else 0/1).
    max_skip_fraction: stop with TooManySkippedError when more than this fraction of samples is skipped.
    min_samples_before_check: samples (used + skipped) to meet before the fraction is checked mid-epoch.
    tile_size, max_tiles: image / frame tiling (`ImageTransform`).
    max_seq_len: tokens per sample at most (responses are truncated; None: no limit).
    augment: optional callable applied after decoding — to the PIL image (image tasks), to the uint8
        frames `[K, 3, H, W]` (video) or to the waveform `[S]` (audio) — returning the same kind.
        There is no default augmentation; in particular no horizontal flip (captions say "left"/"right").
    drop_last: drop each worker's last partial batch of an epoch (image and video; audio buckets vary).
    prefetch_factor: batches prefetched per worker (num_workers > 0 only).
    check_tars: walk each local .tar's headers before reading it, to count corrupt headers that
        Python's tarfile would silently treat as the end of the archive.
    """

    shards: str | os.PathLike[str] | list[str] | tuple[str, ...]
    batch_size: int = 8
    num_workers: int = 0
    resampled: bool = False
    seed: int = 0
    epoch: int = 0
    samples_per_epoch: int | None = None
    shuffle: bool = True
    shuffle_buffer: int = 1000
    rank: int | None = None
    world_size: int | None = None
    max_skip_fraction: float = 0.1
    min_samples_before_check: int = 100
    tile_size: int = 560
    max_tiles: int = 4
    max_seq_len: int | None = None
    augment: Callable[[Any], Any] | None = None
    drop_last: bool = False
    prefetch_factor: int = 2
    check_tars: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoaderConfig.{name} must be a positive integer, got {value!r}")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LoaderConfig.{name} must be an integer >= 0, got {value!r}")

        for name in ("batch_size", "tile_size", "max_tiles", "prefetch_factor"):
            positive(name)
        for name in ("samples_per_epoch", "max_seq_len"):
            positive(name, allow_none=True)
        for name in ("num_workers", "shuffle_buffer", "min_samples_before_check", "seed", "epoch"):
            non_negative(name)
        if isinstance(self.max_skip_fraction, bool) or not isinstance(self.max_skip_fraction, (int, float)) or not (
            0.0 <= self.max_skip_fraction <= 1.0
        ):
            raise ValueError(f"LoaderConfig.max_skip_fraction must be within [0, 1], got {self.max_skip_fraction!r}")
        if self.augment is not None and not callable(self.augment):
            raise ValueError(f"LoaderConfig.augment must be callable or None, got {type(self.augment).__name__}")
        if self.rank is not None or self.world_size is not None:
            if self.rank is None or self.world_size is None:
                raise ValueError(
                    f"LoaderConfig: give both rank and world_size or neither (got rank={self.rank!r}, "
                    f"world_size={self.world_size!r})"
                )
            node_info(self.rank, self.world_size)  # validates


# --------------------------------------------------------------------------------------------------
# per-sample processing


class _Skip(Exception):
    """Internal: this sample cannot be used (`reason` is the stats tag)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Item:
    """A processed sample inside a worker: the collate pair, its `SHARD:KEY`, its audio seconds."""

    pair: tuple[Example, Any]
    source: str
    seconds: float = 0.0


def _describe(e: BaseException) -> str:
    text = str(e)
    return text if text.startswith("cannot decode") else f"{type(e).__name__}: {text}"


class _Timer:
    """Times one stage and turns any exception into a `_Skip` with `reason`."""

    def __init__(self, recorder: StatsRecorder, stage: str, reason: str) -> None:
        self.recorder, self.stage, self.reason = recorder, stage, reason

    def __enter__(self) -> None:
        self.t0 = perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        self.recorder.time(self.stage, perf_counter() - self.t0)
        if exc is None or isinstance(exc, _Skip) or not isinstance(exc, Exception):
            return False
        reason = "empty_labels" if isinstance(exc, EmptyLabelsError) else self.reason
        raise _Skip(reason, _describe(exc)) from exc


def _member(sample: Mapping[str, Any], extensions: tuple[str, ...], what: str) -> tuple[str, bytes]:
    for ext in extensions:
        data = sample.get(ext)
        if data is not None:
            return ext, data
    members = sorted(k for k in sample if not k.startswith("__"))
    raise _Skip(
        f"missing_{what}",
        f"no {what} member (expected KEY.{{{','.join(extensions)}}}); the sample has {members}",
    )


def _metadata(sample: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """`(KEY.txt text or None, KEY.json object or {})`; `_Skip("bad_metadata")` if unreadable."""
    text = None
    if sample.get("txt") is not None:
        try:
            text = bytes(sample["txt"]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip("bad_metadata", f"KEY.txt is not UTF-8 text ({e})") from None
    meta: Any = {}
    if sample.get("json") is not None:
        try:
            meta = loads_limited(sample["json"])  # depth limit, lone surrogates, huge integers
        except JSONLimitError as e:
            raise _Skip("bad_metadata", f"KEY.json cannot be used: {e}") from None
        if not isinstance(meta, dict):
            raise _Skip("bad_metadata", f"KEY.json must hold an object, got {type(meta).__name__}")
    return text, meta


def _read(task: str, text: str | None, meta: Mapping[str, Any], **options: Any) -> tuple[str, dict[str, Any]]:
    """`(the task the record is, its fields)`: the registry's record reader (a mixture picks its part);
    an unusable record is a `_Skip` with the reader's reason."""
    spec = get_task(task)
    try:
        return spec.resolve(meta).name, dict(spec.read(text, meta, **options).fields)
    except RecordError as e:
        raise _Skip(e.reason, str(e)) from None


class _Processor:
    """Base of the per-family sample processors: a pipeline stage `(samples, recorder) → _Item`s."""


    def __init__(self, task: str, tokenizer: Tokenizer, media: MediaTokens, config: LoaderConfig) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.media = media
        self.config = config

    def tokenize(self, recorder: StatsRecorder, fields: Mapping[str, Any], task: str | None = None) -> Example:
        """``fields`` as a prompt + response of ``task`` (default: the processor's)."""
        with _Timer(recorder, "tokenize", "bad_field"):
            return build_example(self.tokenizer, self.media, task or self.task, fields,
                                 max_len=self.config.max_seq_len)

    def augment(self, value: Any) -> Any:
        return value if self.config.augment is None else self.config.augment(value)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        raise NotImplementedError

    def __call__(self, src: Iterable[dict[str, Any]], recorder: StatsRecorder) -> Iterator[_Item]:
        it = iter(src)
        while True:
            t0 = perf_counter()
            try:
                sample = next(it)
            except StopIteration:
                return
            recorder.time("read", perf_counter() - t0)
            source = f"{sample.get('__url__', '<unknown shard>')}:{sample.get('__key__', '<no key>')}"
            try:
                item = self.make(sample, source, recorder)
            except _Skip as skip:
                recorder.skip(skip.reason, source, skip.message)
                if self.config.resampled:  # an endless stream must not spin over unusable data
                    recorder.check_stuck(self.config.min_samples_before_check)
                continue
            recorder.sample(sum(len(v) for k, v in sample.items() if isinstance(v, (bytes, bytearray))))
            yield item


class _ImageProcessor(_Processor):

    def __init__(self, *args: Any, prompt: str | None = None) -> None:
        super().__init__(*args)
        self.prompt = prompt
        self.transform = ImageTransform(self.config.tile_size, self.config.max_tiles)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        ext, data = _member(sample, IMAGE_EXTENSIONS, "image")
        with _Timer(recorder, "decode", "bad_metadata"):
            text, meta = _metadata(sample)
        task, fields = _read(self.task, text, meta)
        if self.prompt is not None and task == "caption":
            fields["prompt"] = self.prompt
        example = self.tokenize(recorder, fields, task)
        with _Timer(recorder, "decode", "decode_image"):
            image = decode_image(data, f"{source}.{ext}")
        with _Timer(recorder, "transform", "transform"):
            if self.config.augment is None:  # decode_image already gave RGB with EXIF applied
                tiled = self.transform.tile_tensor(tvF.pil_to_tensor(image))
            else:  # an augmentation may hand back any PIL mode: let the transform normalise it
                tiled = self.transform(self.augment(image), source=f"{source}.{ext}")
        return _Item(pair=(example, [tiled]), source=source)


class _VideoProcessor(_Processor):

    def __init__(self, *args: Any, num_frames: int, prompt: str | None = None) -> None:
        super().__init__(*args)
        self.num_frames = num_frames
        self.prompt = prompt
        self.transform = ImageTransform(self.config.tile_size, self.config.max_tiles)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        ext, data = _member(sample, VIDEO_EXTENSIONS, "video")
        with _Timer(recorder, "decode", "bad_metadata"):
            text, meta = _metadata(sample)
        _, fields = _read(self.task, text, meta)
        if self.prompt is not None and self.task == "video_caption":
            fields["prompt"] = self.prompt
        example = self.tokenize(recorder, fields)
        with _Timer(recorder, "decode", "decode_video"):
            frames = decode_video(data, f"{source}.{ext}", self.num_frames)
        with _Timer(recorder, "transform", "transform"):
            frames = self.augment(frames)
            clip: list[TiledImage] = [self.transform.tile_tensor(frame) for frame in frames]
        return _Item(pair=(example, clip), source=source)


class _AudioProcessor(_Processor):

    def __init__(
        self, *args: Any, max_batch_seconds: float, target_language: str | None, default_language: str | None
    ) -> None:
        super().__init__(*args)
        self.max_batch_seconds = max_batch_seconds
        self.target_language = target_language
        self.default_language = default_language

    def fields(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        options = ({"default_language": self.default_language} if self.task == "asr"
                   else {"target_language": self.target_language})
        return _read(self.task, None, meta, **options)[1]

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        ext, data = _member(sample, AUDIO_EXTENSIONS, "audio")
        with _Timer(recorder, "decode", "bad_metadata"):
            _, meta = _metadata(sample)
        if sample.get("json") is None:
            raise _Skip("missing_field", "audio samples need KEY.json (text, language, optional translation)")
        fields = self.fields(meta)
        with _Timer(recorder, "decode", "decode_audio"):
            wave = decode_audio(data, f"{source}.{ext}", SAMPLE_RATE)
        with _Timer(recorder, "transform", "transform"):
            features = log_mel(self.augment(wave))  # [F, 80]
        frames = int(features.shape[0])
        seconds = frames / FRAMES_PER_SECOND
        if seconds > self.max_batch_seconds:
            raise _Skip(
                "too_long",
                f"{seconds:.2f} s of audio is more than max_batch_seconds={self.max_batch_seconds:g}; "
                "raise the budget or cut long utterances",
            )
        fields["n_speech_tokens"] = speech_token_count(frames)
        example = self.tokenize(recorder, fields)
        return _Item(pair=(example, features), source=source, seconds=seconds)


# --------------------------------------------------------------------------------------------------
# batching inside the worker


@dataclass
class _Packet:
    """What a worker sends per batch: the batch (None for the stats-only packet that ends a worker's
    epoch), the `SHARD:KEY` of each row, and the worker's stats since its previous packet."""

    batch: Any
    sources: list[str]
    stats: LoaderStats


class _Collate:
    """`collation_fn` for webdataset's `batched`: times the family's collate function."""

    def __init__(self, fn: Callable[..., Any], recorder: StatsRecorder, **kwargs: Any) -> None:
        self.fn, self.recorder, self.kwargs = fn, recorder, kwargs

    def __call__(self, items: list[_Item]) -> tuple[Any, list[str]]:
        t0 = perf_counter()
        batch = self.fn([it.pair for it in items], **self.kwargs)
        self.recorder.time("collate", perf_counter() - t0)
        self.recorder.batch()
        return batch, [it.source for it in items]


def _item_seconds(item: _Item) -> float:
    return item.seconds


class _Shuffle:
    """Seeded webdataset `shuffle` stage; each invocation (repetition) draws a fresh seed."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed, self.calls = bufsize, seed, 0

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rng = random.Random(mix_seed(self.seed, self.calls))
        self.calls += 1
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(iter(src))


class _BatchStream(torch.utils.data.IterableDataset):
    """The dataset each DataLoader worker iterates: `_Packet`s of batches for one epoch."""

    def __init__(self, urls: list[str], config: LoaderConfig, processor: _Processor, collate: Callable[..., Any],
                 collate_kwargs: dict[str, Any], bucket_seconds: float | None = None, bucket_buffer: int = 64) -> None:
        super().__init__()
        self.urls = urls
        self.rank, self.world_size = node_info(config.rank, config.world_size)
        self.config = config
        self.processor = processor
        self.collate = collate
        self.collate_kwargs = collate_kwargs
        self.bucket_seconds = bucket_seconds
        self.bucket_buffer = bucket_buffer
        self.epoch = config.epoch

    def source(self, recorder: StatsRecorder) -> ShardSource:
        cfg = self.config
        return ShardSource(
            self.urls, resampled=cfg.resampled, seed=cfg.seed, epoch=self.epoch, shuffle=cfg.shuffle,
            rank=self.rank, world_size=self.world_size, recorder=recorder, check_tars=cfg.check_tars,
        )

    def __iter__(self) -> Iterator[_Packet]:
        cfg = self.config
        worker_id, num_workers = worker_info()
        recorder = StatsRecorder()
        stages: list[Any] = tar_samples(self.source(recorder))
        if cfg.shuffle and cfg.shuffle_buffer > 1:
            stages.append(_Shuffle(cfg.shuffle_buffer, mix_seed(cfg.seed, self.epoch, self.rank, worker_id)))
        stages.append(partial(self.processor, recorder=recorder))
        samples = wds.DataPipeline(*stages)
        share = None if cfg.samples_per_epoch is None else samples_per_worker(cfg.samples_per_epoch, worker_id, num_workers)
        if share == 0:
            yield _Packet(None, [], recorder.take_delta())
            return
        if share is not None:
            samples = samples.with_epoch(share)
        collate = _Collate(self.collate, recorder, **self.collate_kwargs)
        if self.bucket_seconds is None:
            batches: Iterable[tuple[Any, list[str]]] = wds.batched(
                cfg.batch_size, collation_fn=collate, partial=not cfg.drop_last
            )(iter(samples))
        else:
            buckets = bucket_by_duration(
                iter(samples), _item_seconds, self.bucket_seconds, buffer_size=self.bucket_buffer,
                max_batch=cfg.batch_size,
            )
            batches = (collate(group) for group in buckets)
        for batch, sources in batches:
            yield _Packet(batch, sources, recorder.take_delta())
        yield _Packet(None, [], recorder.take_delta())


# --------------------------------------------------------------------------------------------------
# the loader


class Loader(Generic[B]):
    """An iterable of model-ready batches; each `iter()` is one epoch.

    Attributes:
        config: the `LoaderConfig`.
        task: the task the batches are built for.
        urls: the expanded shard list.
        stats: `LoaderStats` aggregated over all workers and epochs so far (samples, batches, skips by
            reason with recent `SHARD:KEY` examples, bytes, seconds per stage).
        epoch: the epoch the next iteration uses (advanced by each iteration; see `set_epoch`).

    Iteration merges each worker's stats delta and calls `stats.check`, raising `TooManySkippedError`
    when more than `config.max_skip_fraction` of the samples were skipped; at the end of an epoch the
    check runs on that epoch's counts whatever their number, and an epoch that met no sample at all
    raises `ValueError`.
    """

    def __init__(self, stream: _BatchStream, task: str) -> None:
        self.config = stream.config
        self.task = task
        self.urls = stream.urls
        self.rank, self.world_size = stream.rank, stream.world_size
        self.stats = LoaderStats()
        self.epoch = self.config.epoch
        self._stream = stream
        cfg = self.config
        kwargs: dict[str, Any] = {"batch_size": None, "num_workers": cfg.num_workers, "persistent_workers": False}
        if cfg.num_workers > 0:
            kwargs["prefetch_factor"] = cfg.prefetch_factor
        self._loader = wds.WebLoader(stream, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next iteration (shard order, resampling and shuffle seeds)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[B]:
        for batch, _ in self.iter_with_sources():
            yield batch

    def iter_with_sources(self) -> Iterator[tuple[B, list[str]]]:
        """One epoch of `(batch, sources)`, `sources[b]` = ``"SHARD:KEY"`` of row `b`."""
        cfg = self.config
        self._stream.epoch = self.epoch
        self.epoch += 1
        epoch_stats = LoaderStats()
        for packet in self._loader:
            self.stats.merge(packet.stats)
            epoch_stats.merge(packet.stats)
            self.stats.check(cfg.max_skip_fraction, cfg.min_samples_before_check)
            if packet.batch is not None:
                yield packet.batch, packet.sources
        epoch_stats.check(cfg.max_skip_fraction, 1)
        if epoch_stats.seen == 0:
            raise ValueError(
                f"epoch {self._stream.epoch} of rank {self.rank}/{self.world_size} met no sample in "
                f"{len(self.urls)} shard(s) ({epoch_stats.shards} opened by this rank's "
                f"{max(cfg.num_workers, 1)} worker(s)); with explicit epochs every rank and worker needs "
                "shards: use at least world_size × num_workers shards, or resampled=True"
            )

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"Loader(task={self.task!r}, {len(self.urls)} shards, batch_size={cfg.batch_size}, "
            f"num_workers={cfg.num_workers}, {'resampled' if cfg.resampled else 'epochs'}, epoch={self.epoch})"
        )


# --------------------------------------------------------------------------------------------------
# public constructors


def _tokenizer(tokenizer: Tokenizer | str | os.PathLike[str]) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_path(tokenizer)
    raise ValueError(f"tokenizer must be a Tokenizer or a path, got {type(tokenizer).__name__}")


def _setup(config: LoaderConfig, tokenizer: Tokenizer | str | os.PathLike[str], media: MediaTokens | None
           ) -> tuple[list[str], Tokenizer, MediaTokens, int]:
    if not isinstance(config, LoaderConfig):
        raise ValueError(f"config must be a LoaderConfig, got {type(config).__name__}")
    urls = expand_shards(config.shards)
    tok = _tokenizer(tokenizer)
    media = media if media is not None else MediaTokens(tok.vocab_size)
    media.check_tokenizer(tok)
    _, world_size = node_info(config.rank, config.world_size)
    if not config.resampled and len(urls) < world_size * max(config.num_workers, 1):
        warnings.warn(
            f"{len(urls)} shard(s) for {world_size} rank(s) × {max(config.num_workers, 1)} worker(s): "
            "some workers get no shards and ranks may see different numbers of batches; write more, smaller "
            "shards or use resampled=True with samples_per_epoch",
            stacklevel=3,
        )
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eot_id
    return urls, tok, media, pad_id


def image_text_loader(
    config: LoaderConfig,
    tokenizer: Tokenizer | str | os.PathLike[str],
    *,
    task: str = "caption",
    prompt: str | None = None,
    media: MediaTokens | None = None,
) -> Loader[ImageTextBatch]:
    """Image-text batches for `task` ``"caption"`` (caption from ``KEY.txt`` or ``caption`` in
    ``KEY.json``), ``"vqa"`` (``question`` / ``answer`` in ``KEY.json``) or ``"caption_vqa"`` (per record:
    vqa when its KEY.json has a ``question``, else caption).

    Each sample's image becomes `config.max_tiles`-bounded tiles of `config.tile_size` (Llama 3.2 Vision
    tiling) and its text one ``<|image|>`` prompt in the Llama 3 chat format (`prompt` overrides the
    caption instruction). Batches are `ImageTextBatch`: ``text.input_ids / labels / attention_mask
    [B, T]``, ``images.pixels [B, 1, max_tiles, 3, tile, tile]``, ``aspect_ratio_ids [B, 1]``,
    ``tile_mask [B, 1, max_tiles]``. `media` defaults to ``MediaTokens(tokenizer.vocab_size)``.
    """
    if task not in IMAGE_TASKS:
        raise ValueError(f"image_text_loader task must be one of {IMAGE_TASKS}, got {task!r}")
    urls, tok, media, pad_id = _setup(config, tokenizer, media)
    processor = _ImageProcessor(task, tok, media, config, prompt=prompt)
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
) -> Loader[VideoTextBatch]:
    """Video-text batches for `task` ``"video_caption"`` or ``"video_qa"``.

    Each clip is decoded to `num_frames` (K) frames spread uniformly over the whole clip, each frame
    tiled like an image. Batches are `VideoTextBatch`: text ``[B, T]``, ``frames.pixels
    [B, K, max_tiles, 3, tile, tile]`` with ``frames.tile_mask [B, K, max_tiles]`` and ``frame_mask
    [B, K]``.
    """
    if task not in VIDEO_TASKS:
        raise ValueError(f"video_text_loader task must be one of {VIDEO_TASKS}, got {task!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    urls, tok, media, pad_id = _setup(config, tokenizer, media)
    processor = _VideoProcessor(task, tok, media, config, num_frames=num_frames, prompt=prompt)
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
    if task not in AUDIO_TASKS:
        raise ValueError(f"audio_text_loader task must be one of {AUDIO_TASKS}, got {task!r}")
    if isinstance(max_batch_seconds, bool) or not isinstance(max_batch_seconds, (int, float)) or not max_batch_seconds > 0:
        raise ValueError(f"max_batch_seconds must be a number > 0, got {max_batch_seconds!r}")
    if isinstance(bucket_buffer, bool) or not isinstance(bucket_buffer, int) or bucket_buffer < 1:
        raise ValueError(f"bucket_buffer must be a positive integer, got {bucket_buffer!r}")
    urls, tok, media, pad_id = _setup(config, tokenizer, media)
    processor = _AudioProcessor(task, tok, media, config,
                                max_batch_seconds=float(max_batch_seconds), target_language=target_language,
                                default_language=default_language)
    stream = _BatchStream(urls, config, processor, collate_audio_text, {"pad_id": pad_id},
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
    if task in AUDIO_TASKS:
        return audio_text_loader(config, tokenizer, task=task, **options)
    raise ValueError(f"unknown task {task!r}; expected one of {IMAGE_TASKS + VIDEO_TASKS + AUDIO_TASKS}")
