"""Fill a model built on the meta device from a stream of tensors, with checks that name the problem."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or cannot be read: missing, unknown, mis-shaped, non-float or
    non-finite tensors, absent or damaged files, malformed config fields. The message is one line."""


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
    expected = dict(model.state_dict(keep_vars=True))
    tied = _tied_aliases(model)
    loaded: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    non_finite: list[str] = []
    for key, tensor in tensors:
        if key not in expected:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(expected[key].shape)}; does the config match these weights?"
            )
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; expected floating "
                "point weights (float32, bfloat16 or float16); the checkpoint is damaged or not a Llama checkpoint"
            )
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if value.is_floating_point() and not all_finite(value):
            non_finite.append(_non_finite_name(key, tensor, value))
        loaded[key] = value
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} unknown key(s) the model has no place for: {_listing(unknown)}"
        )
    if non_finite:
        raise CheckpointError(
            f"{source}: {len(non_finite)} tensor(s) hold NaN or Inf values: {_listing(non_finite, limit=5)}; "
            "the checkpoint is damaged (re-download it) or was saved from a diverged run"
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


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or Inf in `tensor`, checked in slices so the temporary mask stays small (16 MB)."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


def _non_finite_name(key: str, original: torch.Tensor, cast: torch.Tensor) -> str:
    """`key`, noting when the values only overflowed in the cast to the load dtype."""
    if original.dtype != cast.dtype and all_finite(original):
        return f"{key} (finite as {str(original.dtype).removeprefix('torch.')}, overflows "  \
               f"{str(cast.dtype).removeprefix('torch.')}; load in bfloat16 or float32)"
    return key


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
