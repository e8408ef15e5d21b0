"""Which device and weights dtype to run a model on, from user-facing names."""

from __future__ import annotations

import torch

from mm_llama.checkpoints.loading import DTYPES


def pick_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``; None or ``auto``: CUDA when available) and ``dtype`` (a
    `DTYPES` name; None: bfloat16 on CUDA, float32 on CPU) → ``(torch.device, torch.dtype)``."""
    auto = device in (None, "auto")
    chosen = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for CUDA but no CUDA device is available; use cpu")
    if dtype is not None:
        return chosen, DTYPES[dtype]
    return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
