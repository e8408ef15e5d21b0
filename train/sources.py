"""Where a stage's batches come from: epoch sources over the webdataset loaders and over packed text,
each able to start at any batch of any epoch (what a resumed run needs)."""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Protocol

from mm_llama.config import LlamaConfig
from mm_llama.data.packed_text import PackedTextData
from mm_llama.data.pipelines import LoaderConfig, loader_for_task
from mm_llama.data.tasks import TASKS
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer
from mm_llama.train.recipe import RecipeConfig, RecipeError


class EpochSource(Protocol):
    """Something that yields an epoch's batches from any starting batch."""

    def iter_epoch(self, epoch: int, skip: int) -> Iterator[Any]: ...

    @property
    def skipped_samples(self) -> int: ...


class LoaderSource:
    """A `mm_llama.data.pipelines.Loader` as an `EpochSource` (skipping = reading and dropping batches)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def iter_epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        self.loader.set_epoch(epoch)
        it = iter(self.loader)
        for _ in range(skip):
            if next(it, None) is None:
                break
        return it

    @property
    def skipped_samples(self) -> int:
        return int(self.loader.stats.skipped_total)


class PackedSource:
    """`PackedTextData` as an `EpochSource` (skipping is free)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def iter_epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        return self.data.iter_epoch(epoch, min(skip, self.data.batches_per_epoch))

    @property
    def skipped_samples(self) -> int:
        return 0


def packed_text_source(cfg: RecipeConfig, lm_cfg: LlamaConfig, tokenizer: Tokenizer, shards: list[str], *,
                       rank: int, world_size: int, evaluation: bool) -> PackedSource:
    """`data.task: lm`: the documents of `shards` packed into rows of `data.max_seq_len` (or the LM's) tokens."""
    seq_len = cfg.data.max_seq_len or lm_cfg.max_seq_len
    if seq_len > lm_cfg.max_seq_len:
        raise RecipeError(f"data.max_seq_len={seq_len} exceeds the model's max_seq_len {lm_cfg.max_seq_len}")
    unknown = sorted(set(cfg.data.options) - {"allow_special"})
    if unknown:
        raise RecipeError(f"data.options {unknown} mean nothing to data.task=lm; it takes allow_special (true: "
                          "special-token text in documents, e.g. the chat template, becomes special tokens)")
    return PackedSource(PackedTextData(shards, tokenizer, seq_len=seq_len, batch_size=cfg.data.batch_size,
                                       seed=cfg.data.seed, shuffle=cfg.data.shuffle and not evaluation,
                                       rank=rank, world_size=world_size,
                                       allow_special=bool(cfg.data.options.get("allow_special", False))))


def task_loader_source(cfg: RecipeConfig, task: str, tokenizer: Tokenizer | None, lm_cfg: LlamaConfig | None,
                       shards: list[str], *,
                       rank: int, world_size: int, evaluation: bool, tile_size: int = 560,
                       max_tiles: int = 4) -> LoaderSource:
    """The webdataset loader of `task` over `shards`, tiling images as the encoder expects (`tile_size`,
    `max_tiles`; unused by audio); an evaluation source reads in order, every sample once, the same on
    every rank. `tokenizer` and `lm_cfg` are None for a task without text (`best_rq`)."""
    d = cfg.data
    loader_cfg = LoaderConfig(
        shards=shards, batch_size=d.batch_size, num_workers=d.num_workers,
        resampled=d.resampled and not evaluation, seed=d.seed,
        samples_per_epoch=None if evaluation else d.samples_per_epoch,
        shuffle=d.shuffle and not evaluation, shuffle_buffer=d.shuffle_buffer, rank=rank, world_size=world_size,
        max_skip_fraction=d.max_skip_fraction, min_samples_before_check=d.min_samples_before_check,
        tile_size=tile_size, max_tiles=max_tiles,
        max_seq_len=d.max_seq_len or (lm_cfg.max_seq_len if lm_cfg is not None else None),
        drop_last=d.drop_last and not evaluation, prefetch_factor=d.prefetch_factor, check_tars=d.check_tars,
    )
    options = dict(d.options)
    if d.prompt is not None:
        options["prompt"] = d.prompt
    if d.max_batch_seconds is not None and TASKS[task].modality == "speech":
        options["max_batch_seconds"] = d.max_batch_seconds
    if d.num_frames is not None and TASKS[task].modality == "video":
        options["num_frames"] = d.num_frames
    with warnings.catch_warnings():
        if evaluation:
            warnings.simplefilter("ignore")  # one process reads every eval shard: the few-shards warning is moot
        media = MediaTokens(lm_cfg.vocab_size) if lm_cfg is not None else None
        loader = loader_for_task(task, loader_cfg, tokenizer, media=media, **options)
    return LoaderSource(loader)


__all__ = ["EpochSource", "LoaderSource", "PackedSource", "packed_text_source", "task_loader_source"]
