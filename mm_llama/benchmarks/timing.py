"""Timing for benchmarks: candidates run alternately, each figure is the median of its runs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: torch.device) -> str:
    """What a report names the device as: the GPU's name, or the CPU with its thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass
class Timings:
    """Seconds of every timed run of one candidate."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max − min) / median: how much the runs disagree."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0


def time_alternating(
    candidates: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, Timings]:
    """Run each candidate `warmup` times untimed, then `repeats` rounds of one timed run each, in turn.

    Alternating spreads drift (clock boost, other load, allocator state) over every candidate alike,
    which back-to-back blocks of runs would charge to whichever ran last.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    out = {name: Timings(name) for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            start = perf_counter()
            fn()
            synchronize(device)
            out[name].seconds.append(perf_counter() - start)
    return out
