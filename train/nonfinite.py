"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

    guard = NonFiniteGuard(cfg.train.max_nonfinite_in_a_row)
    ...
    loss.backward()
    outcome = guarded_step(optimizer, trainable_params, loss=loss_for_all_ranks, step=step,
                           guard=guard, grad_clip=cfg.optim.grad_clip)

In distributed runs pass the loss averaged over ranks (`all_reduce_mean`): DDP already averages the
gradients, so every rank then takes the same decision and the replicas stay identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient, or the run ended on one."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Trained tensors hold NaN or infinity; they are neither checkpointed nor exported. (A kind of
    `NonFiniteLossError`, so that callers that stop on non-finite losses stop on this too.)"""


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` that hold a NaN or ±inf (in `state`'s order)."""
    return [name for name, t in state.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all())]


def check_finite_weights(state: Mapping[str, torch.Tensor], what: str, advice: str) -> None:
    """Raise `NonFiniteWeightsError` naming (up to 10 of) the tensors of `state` that are not finite.

    `what` says which weights (e.g. "the weights to export to RUN/adapter.safetensors"); `advice` what
    to do about it."""
    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise NonFiniteWeightsError(f"{len(bad)} of {len(state)} tensors of {what} hold NaN or infinity: {shown}; "
                                    f"{advice}")


def _as_float(value: torch.Tensor | float) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


class NonFiniteGuard:
    """Counts non-finite steps (`total`, `in_a_row`) and remembers the last finite loss.

    `check(step, loss, grad_norm)` returns True when the step may be applied and False when it must be
    skipped; it raises `NonFiniteLossError` on the `max_in_a_row`-th consecutive skip.
    """

    def __init__(self, max_in_a_row: int) -> None:
        if isinstance(max_in_a_row, bool) or not isinstance(max_in_a_row, int) or max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be a positive integer, got {max_in_a_row!r}")
        self.max_in_a_row = max_in_a_row
        self.total = 0
        self.in_a_row = 0
        self.last_finite_loss: float | None = None
        self.last_finite_step: int | None = None

    def check(self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None = None) -> bool:
        loss_value = _as_float(loss)
        norm_value = None if grad_norm is None else _as_float(grad_norm)
        if math.isfinite(loss_value) and (norm_value is None or math.isfinite(norm_value)):
            self.in_a_row = 0
            self.last_finite_loss, self.last_finite_step = loss_value, step
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            last = (f"the last finite loss was {self.last_finite_loss:.6g} at step {self.last_finite_step}"
                    if self.last_finite_loss is not None else "no step had a finite loss yet")
            raise NonFiniteLossError(
                f"step {step}: {self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(loss {loss_value}, grad norm {norm_value}); {last}. Lower the learning rate, check the data, "
                "or use fp32 (train.precision=fp32); train.max_nonfinite_in_a_row sets the limit"
            )
        return False

    def state_dict(self) -> dict[str, float | int | None]:
        return {"total": self.total, "in_a_row": self.in_a_row, "last_finite_loss": self.last_finite_loss,
                "last_finite_step": self.last_finite_step}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.total = int(state.get("total") or 0)
        self.in_a_row = int(state.get("in_a_row") or 0)
        self.last_finite_loss = state.get("last_finite_loss")  # type: ignore[assignment]
        self.last_finite_step = state.get("last_finite_step")  # type: ignore[assignment]


@dataclass
class StepOutcome:
    """What `guarded_step` did: `applied` False means the update was skipped (gradients cleared)."""

    applied: bool
    grad_norm: float
    loss: float


def guarded_step(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    *,
    loss: torch.Tensor | float,
    step: int,
    guard: NonFiniteGuard,
    grad_clip: float | None = None,
) -> StepOutcome:
    """Clip gradients (when `grad_clip`), then apply `optimizer.step()` unless the loss or the global
    gradient norm is non-finite; a skipped step only clears the gradients. Gradients are zeroed
    (`set_to_none`) either way. The scheduler is the caller's: stepping it on skipped steps too keeps
    the schedule aligned with the step count."""
    params = [p for p in parameters if p.grad is not None]
    if params:
        max_norm = grad_clip if grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
        grad_norm = _as_float(norm)
    else:
        grad_norm = 0.0
    applied = guard.check(step, loss, grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(applied, grad_norm, _as_float(loss))


__all__ = [
    "NonFiniteGuard", "NonFiniteLossError", "NonFiniteWeightsError", "StepOutcome",
    "check_finite_weights", "guarded_step", "non_finite_tensors",
]
