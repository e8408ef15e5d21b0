"""Which device and weights dtype to run a model on, from user-facing names."""

from __future__ import annotations

import torch

from mm_llama.checkpoints.loading import parse_dtype

DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a `torch.device`; a ValueError names anything else."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps (or auto)")
    return chosen


def pick_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; None or ``auto``: CUDA when available) and ``dtype``
    (a `DTYPES` name; None: bfloat16 on CUDA, float32 elsewhere) → ``(torch.device, torch.dtype)``."""
    auto = device in (None, "auto")
    chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu") if auto else parse_device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for CUDA but no CUDA device is available; use cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device} asked for Apple MPS, which this machine does not have; use cpu")
    if dtype is not None:
        return chosen, parse_dtype(dtype)
    return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
