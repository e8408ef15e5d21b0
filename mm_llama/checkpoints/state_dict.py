"""Fill a model built on the meta device from a stream of tensors, with checks that name the problem."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unknown or mis-shaped tensors, absent files."""


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def assign_state_dict(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    source: str,
) -> nn.Module:
    """Move each `(key, tensor)` to `dtype`/`device` and assign it into `model` (strict).

    The model's own parameters may live on the meta device: only the checkpoint's tensors are ever
    materialised, one at a time, so loading never needs twice the model's memory.
    """
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    tied = _tied_aliases(model)
    loaded: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in tensors:
        if key not in expected:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key]):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[key])}; does the config match these weights?"
            )
        loaded[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} unknown key(s) the model has no place for: {_listing(unknown)}"
        )
    for alias, target in tied.items():
        if alias not in loaded and target in loaded:
            loaded[alias] = loaded[target]
    missing = set(expected) - set(loaded)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} missing key(s): {_listing(missing)}")
    model.load_state_dict(loaded, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Map each state-dict key that shares storage with an earlier key to that key."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        ident = id(param)
        if ident in first_name:
            aliases[name] = first_name[ident]
        else:
            first_name[ident] = name
    return aliases
