"""The loader a pipeline family returns: per-worker batching of processed samples (shuffle buffer, batches
or duration buckets, the stats delta each batch carries) and :class:`Loader`, which runs the workers,
aggregates their :class:`~mm_llama.data.loader_stats.LoaderStats` and stops on too many skips."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import Any, Generic, TypeVar

import torch
import webdataset as wds

from mm_llama.data.collate import bucket_by_duration
from mm_llama.data.loader_config import LoaderConfig
from mm_llama.data.loader_stats import LoaderStats, StatsRecorder
from mm_llama.data.sample_processors import _Item, _Processor
from mm_llama.data.shard_source import (
    ShardSource, mix_seed, node_info, samples_per_worker, tar_samples, worker_info,
)

__all__ = ["Loader"]

B = TypeVar("B")

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
