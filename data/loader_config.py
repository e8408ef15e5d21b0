"""`LoaderConfig`: the settings every webdataset pipeline family shares (see `mm_llama.data.pipelines`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mm_llama.data.shard_source import node_info

__all__ = ["LoaderConfig"]


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
