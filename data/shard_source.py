"""Where samples come from: shard lists, epochs or resampling, node and worker splits, damaged tars.

* :func:`expand_shards` turns what a user passes (``"dir/shard-{000000..000009}.tar"`` brace patterns,
  a directory of ``.tar`` files, a glob, a single path, remote URLs, or a list of any of these) into a
  list of shard URLs, with a clear error when nothing matches.
* :class:`ShardSource` yields ``{"url": shard}`` dicts for the calling process and DataLoader worker,
  in one of two modes:

  - **explicit epochs** (default): every rank and worker shuffles the whole list with the same seed for
    the epoch (``seed``, ``epoch``, repetition), then takes every ``world_size``-th shard from its
    ``rank`` (:func:`split_by_node`) and of those every ``num_workers``-th from its worker id
    (:func:`split_by_worker`). All (rank, worker) pairs thus see disjoint shards that together cover
    the list exactly once per epoch.
  - **resampled**: each worker draws shards with replacement, forever, from webdataset's
    ``ResampledShards`` seeded by (``seed``, ``epoch``, rank, worker, repetition): reproducible for a
    seed, different across workers and epochs. Bound the epoch with ``with_epoch`` (the pipelines'
    ``samples_per_epoch``).

* :func:`tar_samples` reads the shards with webdataset's tar iterators (``url_opener`` →
  ``tar_file_expander`` → ``group_by_keys``, what ``tarfile_to_samples`` chains) and a
  :class:`TarErrorHandler`: a truncated or corrupt archive is skipped (its good members are kept) and
  counted once per shard in the worker's :class:`~mm_llama.data.loader_stats.StatsRecorder`, with the
  number of the shard's samples read before the damage and, when the shard's sample count is known
  (:func:`expected_samples`: the ``stats.json`` that ``mm-llama shards`` writes beside its shards), the
  number lost after it; otherwise "the rest of the shard (unknown count)".
  Python's ``tarfile`` silently ends an archive at a corrupt header that is not the first one, and at
  the end of the file when the end-of-archive marker is missing (a tar cut exactly at a member
  boundary), so for local ``.tar`` files :func:`inspect_tar` first walks the headers and reports data
  it would leave unread. Bytes after a proper end-of-archive marker (zero padding, trailing garbage)
  lose nothing: they are noted once per shard (log level INFO), not counted.
* A resampled source that cannot read anything stops with :class:`UnreadableShardsError` naming the
  shards and why (0 bytes, git-lfs pointer, not a tar, ...) once every shard of the list was drawn
  since the last sample was read, or after ``stall_limit`` shards in a row gave no sample.

Seeds are mixed with :func:`mix_seed` (BLAKE2 of the integers), never with Python's ``hash`` of
strings, so that orders are identical across processes and runs.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from mm_llama.data.loader_stats import StatsRecorder
from mm_llama.data.tar_check import TarCheck, expected_samples_of, file_hint, inspect_tar_file

logger = logging.getLogger("mm_llama.data")

__all__ = [
    "SHARD_SUFFIXES",
    "ShardSource",
    "TarCheck",
    "TarErrorHandler",
    "UnreadableShardsError",
    "check_tar_end",
    "expand_shards",
    "expected_samples",
    "inspect_tar",
    "is_remote",
    "mix_seed",
    "node_info",
    "samples_per_worker",
    "split_by_node",
    "split_by_worker",
    "tar_samples",
    "worker_info",
]

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
"""File names a directory is searched for (img2dataset/video2dataset also leave .parquet and
_stats.json files beside their shards; those are ignored)."""

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "ais://", "hf://")
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------------------
# shard lists


def is_remote(url: str) -> bool:
    """Whether shard `url` is read through a command or the network (``pipe:``, ``http(s)://``, ``s3://``,
    ...) rather than from a local file (a path or a ``file:`` URL)."""
    return url.startswith(_REMOTE_PREFIXES) or ("://" in url and not url.startswith("file:"))


_is_remote = is_remote


def _local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL (``file:`` prefix removed), None for remote ones."""
    if _is_remote(url):
        return None
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return url


def _tars_in(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(directory, name))
    )


def _expand_one(spec: str) -> list[str]:
    """One string → shard URLs (brace patterns first, then directories, globs, single files)."""
    if _is_remote(spec):
        return list(expand_urls(spec))
    urls: list[str] = []
    missing: list[str] = []
    for item in expand_urls(os.path.expanduser(spec)):
        path = _local_path(item) or item
        if os.path.isdir(path):
            found = _tars_in(path)
            if not found:
                raise ValueError(
                    f"shard directory {path!r} holds no {'/'.join(SHARD_SUFFIXES)} files; "
                    "point at the folder the shards were written to"
                )
            urls.extend(found)
        elif _GLOB_CHARS & set(path):
            urls.extend(sorted(p for p in glob.glob(path) if os.path.isfile(p)))
        elif os.path.isfile(path):
            urls.append(item)
        else:
            missing.append(item)
    if missing:
        total = len(missing) + len(urls)
        if not urls:
            raise ValueError(
                f"no shards match {spec!r}: {missing[0]!r} does not exist; expected a .tar file, a directory "
                "of .tar files, a glob ('dir/*.tar') or a brace pattern ('dir/shard-{000000..000009}.tar')"
            )
        raise ValueError(
            f"{len(missing)} of the {total} shards named by {spec!r} do not exist (e.g. {missing[0]!r}); "
            "fix the pattern or its brace range"
        )
    if not urls:
        raise ValueError(
            f"no shards match {spec!r}; expected a .tar file, a directory of .tar files, a glob "
            "('dir/*.tar') or a brace pattern ('dir/shard-{000000..000009}.tar')"
        )
    return urls


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Shard URLs named by `shards`, in order.

    `shards` is a string or path — a brace pattern (``"dir/shard-{000000..000009}.tar"``, expanded by
    webdataset/braceexpand, ``::`` separating several), a directory (its ``.tar``/``.tar.gz``/``.tgz``
    files, sorted), a glob (sorted matches) or one file — or a list/tuple of those (concatenated).
    Remote URLs (``pipe:``, ``http(s)://``, ``s3://``, ...) pass through unchecked. Raises
    `ValueError` naming the pattern when nothing matches or a named local shard does not exist.
    """
    if isinstance(shards, (str, os.PathLike)):
        specs = [os.fspath(shards)]
    elif isinstance(shards, Sequence) and not isinstance(shards, (bytes, bytearray)):
        specs = []
        for i, s in enumerate(shards):
            if not isinstance(s, (str, os.PathLike)):
                raise ValueError(f"shards[{i}] must be a path or URL string, got {type(s).__name__} {s!r:.80}")
            specs.append(os.fspath(s))
        if not specs:
            raise ValueError("the shard list is empty; pass at least one .tar file, directory, glob or pattern")
    else:
        raise ValueError(
            f"shards must be a path, a pattern or a list of them, got {type(shards).__name__} {shards!r:.80}"
        )
    urls: list[str] = []
    for spec in specs:
        if not spec.strip():
            raise ValueError("a shard path is empty; pass a .tar file, a directory, a glob or a brace pattern")
        urls.extend(_expand_one(spec))
    return urls


# --------------------------------------------------------------------------------------------------
# ranks, workers, seeds


def node_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """`(rank, world_size)`: the arguments when given, else torch.distributed's when it is
    initialised, else the ``RANK`` / ``WORLD_SIZE`` environment variables (set by torchrun), else
    ``(0, 1)``. Raises `ValueError` for an inconsistent pair."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            d_rank, d_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            try:
                d_rank = int(os.environ.get("RANK", "0"))
                d_world = int(os.environ.get("WORLD_SIZE", "1"))
            except ValueError:
                raise ValueError(
                    f"environment RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                    "are not integers; fix them or pass rank= and world_size= explicitly"
                ) from None
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def worker_info() -> tuple[int, int]:
    """`(worker_id, num_workers)` of the calling DataLoader worker, `(0, 1)` in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (int(info.id), int(info.num_workers))


def split_by_node(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Every `world_size`-th item of `src`, starting at `rank` (the shards of one node)."""
    rank, world_size = node_info(rank, world_size)
    return islice(src, rank, None, world_size)


def split_by_worker(src: Iterable[Any], worker_id: int | None = None, num_workers: int | None = None) -> Iterator[Any]:
    """Every `num_workers`-th item of `src`, starting at `worker_id` (defaults: the calling worker's)."""
    if worker_id is None or num_workers is None:
        w_id, w_num = worker_info()
        worker_id = w_id if worker_id is None else worker_id
        num_workers = w_num if num_workers is None else num_workers
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got worker_id={worker_id}, num_workers={num_workers}")
    return islice(src, worker_id, None, num_workers)


def samples_per_worker(total: int, worker_id: int, num_workers: int) -> int:
    """Worker `worker_id`'s share of `total` samples: ``total // n``, plus one for the first ``total % n``."""
    return total // num_workers + (1 if worker_id < total % num_workers else 0)


def mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers, identical in every process (BLAKE2b of their decimal text)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class _WorkerSeed:
    """`worker_seed` callable for `ResampledShards` (a class, so that it pickles for spawned workers)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


# --------------------------------------------------------------------------------------------------
# damaged archives


def inspect_tar(url: str) -> TarCheck:
    """:func:`~mm_llama.data.tar_check.inspect_tar_file` for a local uncompressed ``.tar`` shard URL; an
    empty (intact) check for remote or compressed shards."""
    path = _local_path(url)
    return TarCheck() if path is None else inspect_tar_file(path)


def check_tar_end(url: str) -> str | None:
    """:func:`inspect_tar`'s ``problem``: a message when reading a local ``.tar`` would lose members."""
    return inspect_tar(url).problem


def expected_samples(url: str) -> int | None:
    """How many samples shard `url` holds according to the ``stats.json`` beside it (None: unknown; see
    :func:`~mm_llama.data.tar_check.expected_samples_of`)."""
    path = _local_path(url)
    return None if path is None else expected_samples_of(path)


def _file_hint(url: str) -> str | None:
    path = _local_path(url)
    return None if path is None else file_hint(path)


class UnreadableShardsError(ValueError):
    """A resampled shard source drew shards that yield no sample at all (every shard of its list, or
    `stall_limit` in a row). Constructible from one message string, so that PyTorch can re-raise it in
    the main process when a DataLoader worker raises it."""


def _why_no_samples(url: str, recorded: str | None) -> str:
    """A short reason why shard `url` yielded no sample."""
    return _file_hint(url) or recorded or "no sample in it (no tar member named KEY.EXT)"


class TarErrorHandler:
    """webdataset exception handler for reading tars: count the damaged shard, keep going (returns True).

    The error is counted once per shard pass (reason ``"tar"``, source ``"SHARD:<archive>"``) in
    `recorder`, and logged (rate-limited) like every skip.
    """

    def __init__(self, recorder: StatsRecorder) -> None:
        self.recorder = recorder

    def __call__(self, exn: BaseException) -> bool:
        args = getattr(exn, "args", ()) or ()
        shard = next((a for a in reversed(args) if isinstance(a, str) and a == self.recorder.current_shard), None)
        first = str(args[0]) if args else ""
        first = re.sub(r" @ <[^>]*>$", "", first)  # webdataset appends the stream's repr
        shard = shard or self.recorder.current_shard
        message = f"{type(exn).__name__}: {first}".strip(": ")
        hint = _file_hint(shard) if shard else None
        if hint is not None and (hint.startswith("0 bytes") or hint.startswith("a git-lfs")):
            message = f"{hint} ({message})"
        self.recorder.shard_error(message, shard, expected=expected_samples(shard) if shard else None)
        return True


class _CountMembers:
    """Pipeline stage between the tar reader and the grouping into samples: notes each member's key,
    so that a damaged archive can say how many of its samples were read before the damage."""

    def __init__(self, recorder: StatsRecorder) -> None:
        self.recorder = recorder

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for member in src:
            fname = member.get("fname") if member else None
            if isinstance(fname, str):
                key, _ = base_plus_ext(fname)
                if key is not None:
                    self.recorder.member(key)
            yield member


class _TarSamples:
    """webdataset's ``tarfile_to_samples`` with :class:`_CountMembers` between its stages."""

    def __init__(self, recorder: StatsRecorder) -> None:
        self.recorder = recorder
        self.handler = TarErrorHandler(recorder)

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        streams = url_opener(src, handler=self.handler)
        files = tar_file_expander(streams, handler=self.handler)
        return group_by_keys(_CountMembers(self.recorder)(files), handler=self.handler)


_noted_trailing: set[str] = set()


class _CountRaw:
    """Pipeline stage noting each sample that leaves the tar reader (progress for stall detection)."""

    def __init__(self, recorder: StatsRecorder) -> None:
        self.recorder = recorder

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            self.recorder.raw_samples += 1
            yield sample


# --------------------------------------------------------------------------------------------------
# the source


class ShardSource(torch.utils.data.IterableDataset):
    """Yields ``{"url": shard}`` for the calling rank and worker (see the module docstring for modes).

    Args:
        shards: anything :func:`expand_shards` takes.
        resampled: draw shards with replacement, endlessly (else: explicit epochs).
        seed: base seed of shard shuffling / resampling.
        epoch: epoch number mixed into the seed (use :meth:`set_epoch`).
        shuffle: shuffle the shard list each epoch (explicit mode; resampling is random anyway).
        rank, world_size: this node's place (defaults: :func:`node_info`).
        recorder: where opened shards and damaged archives are counted (a fresh one if None).
        check_tars: run :func:`check_tar_end` on local ``.tar`` shards before reading them.
        stall_limit: resampled mode only — after this many shards in a row that yield no sample at all
            (empty, unreadable, damaged before their first sample), raise `UnreadableShardsError` instead of
            drawing forever (default ``max(100, 10 · number of shards)``). The source also raises as soon
            as every shard of the list was drawn since the last sample was read (usually much earlier).

    Each ``iter()`` is one *repetition*; `with_epoch` repeats an exhausted source within an epoch, and
    each repetition gets its own shuffle. `set_epoch` resets the repetition count, so iteration is
    reproducible from (seed, epoch) alone.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        resampled: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        recorder: StatsRecorder | None = None,
        check_tars: bool = True,
        stall_limit: int | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(shards)
        self.rank, self.world_size = node_info(rank, world_size)
        self.resampled = bool(resampled)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.shuffle = bool(shuffle)
        self.recorder = recorder if recorder is not None else StatsRecorder()
        self.check_tars = check_tars
        self.stall_limit = stall_limit if stall_limit is not None else max(100, 10 * len(self.urls))
        self._repetition = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._repetition = 0

    def epoch_order(self, repetition: int = 0) -> list[str]:
        """Explicit mode: the whole shard list in this epoch's (and repetition's) order, the same on
        every rank and worker (webdataset's ``SimpleShardList`` shuffled with the mixed seed)."""
        seed = mix_seed(self.seed, self.epoch, repetition) if self.shuffle else None
        return [d["url"] for d in wds.SimpleShardList(list(self.urls), seed=seed)]

    def shards_for(self, worker_id: int, num_workers: int, repetition: int = 0) -> list[str]:
        """Explicit mode: the shards (rank, `worker_id`) reads in this epoch's `repetition`."""
        node = split_by_node(self.epoch_order(repetition), self.rank, self.world_size)
        return list(split_by_worker(node, worker_id, num_workers))

    def _resampled(self, worker_id: int, repetition: int) -> Iterator[str]:
        worker_seed = _WorkerSeed(mix_seed(self.rank, worker_id, self.epoch, repetition))
        shards = wds.ResampledShards(list(self.urls), seed=mix_seed(self.seed), worker_seed=worker_seed, deterministic=True)
        return (d["url"] for d in shards)

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker_id, num_workers = worker_info()
        repetition, self._repetition = self._repetition, self._repetition + 1
        if self.resampled:
            urls: Iterable[str] = self._resampled(worker_id, repetition)
        else:
            urls = self.shards_for(worker_id, num_workers, repetition)
        recorder = self.recorder
        everything = set(self.urls)
        dry: list[str] = []  # shards drawn since the last sample was read, in order
        dry_set: set[str] = set()
        for url in urls:
            recorder.shard_opened(url)
            if self.check_tars:
                check = inspect_tar(url)
                if check.problem is not None:
                    recorder.shard_error(check.problem, url, read=check.readable, expected=expected_samples(url))
                if check.trailing is not None and url not in _noted_trailing:
                    _noted_trailing.add(url)
                    logger.info("%s: %s", url, check.trailing)
            before = recorder.progress
            yield {"url": url}
            if not self.resampled:
                continue
            if recorder.progress != before:
                dry.clear()
                dry_set.clear()
                continue
            dry.append(url)
            dry_set.add(url)
            if dry_set >= everything or len(dry) >= self.stall_limit:
                raise UnreadableShardsError(self._explain_dry(dry, dry_set >= everything))

    def _explain_dry(self, dry: list[str], every: bool) -> str:
        shown = list(dict.fromkeys(reversed(dry)))[:5]
        reasons = "; ".join(f"{u} ({_why_no_samples(u, self.recorder.shard_problems.get(u))})" for u in shown)
        more = len(set(dry)) - len(shown)
        head = (
            f"the resampled loader drew every one of its {len(set(self.urls))} shard(s) ({len(dry)} draws in a "
            "row) without finding a single sample, so it can read nothing" if every else
            f"the resampled loader drew {len(dry)} shards in a row (stall_limit={self.stall_limit}) without "
            "finding a single sample"
        )
        return (
            f"{head}: {reasons}{f'; and {more} more' if more > 0 else ''}. Check the shard list: the files must "
            "be webdataset .tar shards (members named KEY.EXT), fully downloaded (not git-lfs pointers, not "
            "truncated)"
        )

    def __repr__(self) -> str:
        mode = "resampled" if self.resampled else "epochs"
        return (
            f"ShardSource({len(self.urls)} shards, {mode}, seed={self.seed}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.world_size})"
        )


def tar_samples(source: ShardSource) -> list[Any]:
    """Pipeline stages turning `source`'s shards into webdataset samples
    (``{"__key__", "__url__", ext: bytes, ...}``), damaged archives counted in ``source.recorder``."""
    return [source, _TarSamples(source.recorder), _CountRaw(source.recorder)]
