"""Loader statistics: samples seen, batches, skipped samples by reason, time per pipeline stage.

DataLoader workers are separate processes, so counts cannot be shared through one object. Each
worker records into its own :class:`StatsRecorder`; every batch leaves the worker together with the
recorder's *delta* (a small :class:`LoaderStats` holding only what happened since the previous batch),
and the main-process loader merges the deltas into one aggregated :class:`LoaderStats` and calls
:meth:`LoaderStats.check`, which raises :class:`TooManySkippedError` when too large a fraction of the
samples could not be used. A worker whose every sample fails (so that it never completes a batch)
raises the same error itself (see :meth:`StatsRecorder.check_stuck`): a loader never loops silently over
bad data.

Every skipped sample is logged as a warning naming its shard and key (``"SHARD:KEY"``), rate-limited
per process (the first :data:`LOG_BURST` skips, then at most one line per :data:`LOG_INTERVAL_S`
seconds that also says how many skips it did not show).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

__all__ = [
    "LOG_BURST",
    "LOG_INTERVAL_S",
    "STAGES",
    "LoaderStats",
    "NO_TYPE",
    "QuestionTypesError",
    "SkipRecord",
    "StatsRecorder",
    "TooManySkippedError",
]

logger = logging.getLogger("mm_llama.data")

LOG_BURST = 10
"""Skips logged one by one (per process) before rate limiting starts."""
LOG_INTERVAL_S = 10.0
"""After the burst, at most one skip warning per this many seconds (per process)."""
RECENT = 8
"""How many of the most recent skipped samples a `LoaderStats` keeps as examples."""

STAGES = ("read", "decode", "transform", "tokenize", "collate")
"""Pipeline stages timed with `time.perf_counter` (seconds accumulate in `LoaderStats.seconds`):
read = pulling samples out of the tar stream and shuffle buffer, decode = media/JSON/text decoding,
transform = augmentation + tiling / log-mel, tokenize = prompt building, collate = batch collation."""


NO_TYPE = "<none>"
"""How `LoaderStats.left_out` counts a record without a question type."""
TYPES_MET_LIMIT = 10_000
"""Records an endless (resampled) stream may leave out, none kept, before `QuestionTypesError`."""


class QuestionTypesError(ValueError):
    """A loader's ``question_types`` kept not one of the records it read."""


class TooManySkippedError(RuntimeError):
    """The loader skipped more samples than `max_skip_fraction` allows (or every sample so far).

    Constructible from a single message string, so that PyTorch can re-raise it in the main process
    when a DataLoader worker raises it.
    """


@dataclass(frozen=True)
class SkipRecord:
    """One skipped sample: why (`reason`, a short tag such as ``"decode_image"``), where
    (`source` = ``"SHARD:KEY"``) and the error message."""

    reason: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source} ({self.reason}: {self.message})"


@dataclass
class LoaderStats:
    """Counters of a loader (aggregated) or of one batch's worth of work in one worker (a delta).

    samples: samples turned into model inputs (each sample at most once).
    batches: batches collated.
    skipped: skipped samples by reason (``Counter[reason]``).
    recent: the last few skipped samples (`SkipRecord`), oldest first.
    bytes: encoded bytes of the samples in `samples` (all their tar members).
    shards: shards opened.
    seconds: seconds spent per pipeline stage (keys from `STAGES`).
    lost: samples known to be lost after damaged archives (each damaged archive is one ``"tar"`` skip;
        the samples after the damage are counted here when the shard's sample count is known, from
        the ``stats.json`` that ``mm-llama shards`` writes beside its shards).
    lost_unknown: damaged archives after which an unknown number of samples was lost (the rest of the
        shard; no ``stats.json`` says how many samples it held).
    left_out: usable records of question types the loader was told to leave out (``question_types``),
        by their type (``"<none>"`` for a record without one); not skips.
    """

    samples: int = 0
    batches: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    recent: deque[SkipRecord] = field(default_factory=lambda: deque(maxlen=RECENT))
    bytes: int = 0
    shards: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    lost: int = 0
    lost_unknown: int = 0
    left_out: Counter[str] = field(default_factory=Counter)

    # -- derived ---------------------------------------------------------------------------------

    @property
    def skipped_total(self) -> int:
        """All skipped samples, every reason together."""
        return sum(self.skipped.values())

    @property
    def unusable(self) -> int:
        """Skipped samples plus samples known to be lost in damaged archives."""
        return self.skipped_total + self.lost

    @property
    def seen(self) -> int:
        """Samples met so far: used + skipped + known lost."""
        return self.samples + self.unusable

    @property
    def skip_fraction(self) -> float:
        """`unusable / seen` (0.0 before any sample)."""
        return self.unusable / self.seen if self.seen else 0.0

    # -- recording -------------------------------------------------------------------------------

    def add_skip(self, record: SkipRecord) -> None:
        self.skipped[record.reason] += 1
        self.recent.append(record)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: LoaderStats) -> LoaderStats:
        """Add `other`'s counts into this one (in place); returns self."""
        self.samples += other.samples
        self.batches += other.batches
        self.skipped.update(other.skipped)
        self.recent.extend(other.recent)
        self.bytes += other.bytes
        self.shards += other.shards
        self.lost += other.lost
        self.lost_unknown += other.lost_unknown
        self.left_out.update(other.left_out)
        for stage, s in other.seconds.items():
            self.add_time(stage, s)
        return self

    # -- checking --------------------------------------------------------------------------------

    def check(self, max_skip_fraction: float, min_samples: int) -> None:
        """Raise `TooManySkippedError` when the loader should stop.

        Once at least `min_samples` samples were met (used + skipped): when the skipped fraction
        exceeds `max_skip_fraction`, or when not one sample could be used (whatever the fraction, so
        that even `max_skip_fraction=1.0` cannot loop forever over unusable data).
        """
        if self.seen < max(int(min_samples), 1):
            return
        if self.skip_fraction > max_skip_fraction or (self.samples == 0 and self.unusable > 0):
            raise TooManySkippedError(self.explain(max_skip_fraction))

    def explain(self, max_skip_fraction: float | None = None) -> str:
        """The message of `TooManySkippedError`: counts, commonest reasons, examples, the remedy."""
        n, total = self.unusable, self.seen
        head = f"the data loader skipped {n} of {total} samples ({100.0 * self.skip_fraction:.1f}%)"
        if self.lost or self.lost_unknown:
            head += f" ({self.lost_text()})"
        if self.samples == 0:
            head += ", and not one sample could be used"
        if max_skip_fraction is not None:
            head += f"; the limit is max_skip_fraction={max_skip_fraction:g}"
        reasons = ", ".join(f"{reason} ({count})" for reason, count in self.skipped.most_common(5))
        examples = "; ".join(str(r) for r in list(self.recent)[-3:])
        return (
            f"{head}. Commonest reasons: {reasons or 'none recorded'}. Recent examples: {examples or 'none'}. "
            "Fix or drop the bad samples (check the shards were written with the expected layout, e.g. "
            "with `mm-llama shards`, which validates every file), or raise the limit with "
            "LoaderConfig(max_skip_fraction=...) (and min_samples_before_check= to check later)."
        )

    def lost_text(self) -> str:
        """What damaged archives lost, honestly: known counts, and the shards whose loss is unknown."""
        parts = []
        if self.lost:
            parts.append(f"{self.lost} sample(s) lost after damaged archives")
        if self.lost_unknown:
            parts.append(f"the rest of {self.lost_unknown} damaged shard(s) lost (unknown count)")
        return "; ".join(parts) or "no samples lost in damaged archives"

    def summary(self) -> str:
        """One line: samples, batches, skips by reason, samples lost in damaged archives."""
        reasons = ", ".join(f"{r}={c}" for r, c in self.skipped.most_common())
        return (
            f"{self.samples} samples in {self.batches} batches, {self.skipped_total} skipped"
            + (f" ({reasons})" if reasons else "")
            + (f", {self.lost_text()}" if self.lost or self.lost_unknown else "")
            + (f", {sum(self.left_out.values())} of other question types left out" if self.left_out else "")
            + f", {self.shards} shards opened, {self.bytes / 1e6:.1f} MB"
        )

    def as_dict(self) -> dict[str, object]:
        """Plain-data view (for logs and JSON)."""
        return {
            "samples": self.samples,
            "batches": self.batches,
            "skipped": dict(self.skipped),
            "skipped_total": self.skipped_total,
            "skip_fraction": self.skip_fraction,
            "recent_skips": [str(r) for r in self.recent],
            "bytes": self.bytes,
            "shards": self.shards,
            "lost": self.lost,
            "lost_unknown": self.lost_unknown,
            "left_out": dict(self.left_out),
            "seconds": dict(self.seconds),
        }


class _SkipLog:
    """Per-process rate limiter for skip warnings (see module docstring)."""

    def __init__(self, burst: int = LOG_BURST, interval: float = LOG_INTERVAL_S) -> None:
        self.burst = burst
        self.interval = interval
        self.count = 0
        self.hidden = 0
        self.last = 0.0
        self.lock = threading.Lock()

    def __call__(self, record: SkipRecord) -> None:
        with self.lock:
            self.count += 1
            now = time.monotonic()
            if self.count > self.burst and now - self.last < self.interval:
                self.hidden += 1
                return
            hidden, self.hidden, self.last = self.hidden, 0, now
        more = f" ({hidden} more skipped samples not shown)" if hidden else ""
        logger.warning("skipping sample %s: %s: %s%s", record.source, record.reason, record.message, more)


_skip_log = _SkipLog()


class StatsRecorder:
    """Records what one worker (or the main process when `num_workers=0`) does.

    `total` accumulates over the recorder's lifetime; `pending` holds what happened since the last
    :meth:`take_delta`, which the pipeline attaches to each batch it yields.
    """

    def __init__(self) -> None:
        self.total = LoaderStats()
        self.pending = LoaderStats()
        self.current_shard: str | None = None
        self.raw_samples = 0  # samples read out of tars (before shuffling and processing)
        self.shard_read = 0  # samples of the current shard whose members were read so far
        self.shard_problems: dict[str, str] = {}  # shard -> why it was counted as damaged (last pass)
        self._shard_key: str | None = None
        self._shard_error_counted = False

    @property
    def progress(self) -> int:
        """Monotonic count of samples read out of tars: tells a source that finds nothing in its shards
        (stalled: empty, unreadable or damaged before their first sample) from a slow one."""
        return self.raw_samples

    def member(self, key: str) -> None:
        """A tar member of sample `key` was read from the current shard (counts the shard's samples)."""
        if key != self._shard_key:
            self._shard_key = key
            self.shard_read += 1

    def sample(self, nbytes: int) -> None:
        for s in (self.total, self.pending):
            s.samples += 1
            s.bytes += nbytes

    def batch(self) -> None:
        self.total.batches += 1
        self.pending.batches += 1

    def skip(self, reason: str, source: str, message: str, *, log: bool = True) -> None:
        record = SkipRecord(reason=reason, source=source, message=_short(message))
        self.total.add_skip(record)
        self.pending.add_skip(record)
        if log:
            _skip_log(record)

    def time(self, stage: str, seconds: float) -> None:
        self.total.add_time(stage, seconds)
        self.pending.add_time(stage, seconds)

    def shard_opened(self, url: str) -> None:
        self.total.shards += 1
        self.pending.shards += 1
        self.current_shard = url
        self.shard_read = 0
        self._shard_key = None
        self._shard_error_counted = False

    def shard_error(
        self, message: str, shard: str | None = None, *, read: int | None = None, expected: int | None = None
    ) -> None:
        """Count a damaged archive (truncated or corrupt tar) once per shard pass; later errors of the
        same pass (tarfile often reports one truncation twice) are logged at debug level only.

        `read`: samples of the shard read before the damage (default: those read so far in this pass).
        `expected`: the shard's sample count if known (``stats.json``); then ``expected - read`` samples
        are counted as `lost`, else the loss is counted in `lost_unknown` ("the rest of the shard"). The
        skip message states both numbers.
        """
        shard = shard or self.current_shard or "<unknown shard>"
        if self._shard_error_counted and shard == self.current_shard:
            logger.debug("further tar error in %s: %s", shard, message)
            return
        if shard == self.current_shard:
            self._shard_error_counted = True
            if read is None:
                read = self.shard_read
        if read is None:
            text = f"{message}; the rest of the shard is lost (unknown count)"
            lost = None
        elif expected is not None and expected >= read:
            lost = expected - read
            text = (f"{message}; {read} sample(s) of this shard were read before it, {lost} lost after it "
                    f"(stats.json: {expected} in the shard)")
        elif read == 0:
            lost = None
            text = f"{message}; no sample of this shard could be read, the whole shard is lost (unknown count)"
        else:
            lost = None
            text = (f"{message}; {read} sample(s) of this shard were read before it, the rest of the shard "
                    "is lost (unknown count)")
        for s in (self.total, self.pending):
            if lost is None:
                s.lost_unknown += 1
            else:
                s.lost += lost
        self.shard_problems[shard] = message
        self.skip("tar", f"{shard}:<archive>", text)

    def take_delta(self) -> LoaderStats:
        """What happened since the previous call (and reset it)."""
        delta, self.pending = self.pending, LoaderStats()
        return delta

    def leave_out(self, qtype: str | None) -> None:
        """A usable record of a question type outside the loader's ``question_types``."""
        for s in (self.total, self.pending):
            s.left_out[qtype or NO_TYPE] += 1

    def check_types_met(self, question_types: frozenset[str] | None, *, finished: bool = False) -> None:
        """Raise `QuestionTypesError` when this worker left out every record it met: at the end of a
        pass over its shards (``finished``), or after `TYPES_MET_LIMIT` records of an endless stream."""
        left_out = sum(self.total.left_out.values())
        if question_types is None or self.total.samples or not left_out:
            return
        if finished or left_out >= TYPES_MET_LIMIT:
            met = ", ".join(f"{t} ({n})" for t, n in self.total.left_out.most_common(8))
            raise QuestionTypesError(
                f"question_types {sorted(question_types)} matched none of the {left_out} records read (their "
                f"KEY.json type: {met}); name types that occur in the shards, or drop question_types")

    def check_stuck(self, min_samples: int) -> None:
        """Raise `TooManySkippedError` when this worker met `min_samples` samples and could use none.

        (A worker whose shards yield no sample at all — empty, unreadable or git-lfs pointer files — is
        stopped by the shard source instead: `mm_llama.data.shard_source.UnreadableShardsError`.)"""
        if self.total.samples == 0 and self.total.unusable >= max(int(min_samples), 1):
            raise TooManySkippedError(self.total.explain())


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
