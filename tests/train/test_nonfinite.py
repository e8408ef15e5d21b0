"""Non-finite guard: skipped and counted, too many in a row stop the run."""

from __future__ import annotations

import math

import pytest
import torch

from mm_llama.train.nonfinite import NonFiniteGuard, NonFiniteLossError, guarded_step


def _setup() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    layer = torch.nn.Linear(3, 2)
    return layer, torch.optim.AdamW(layer.parameters(), lr=0.1)


def _backward(layer: torch.nn.Linear, scale: float) -> torch.Tensor:
    loss = layer(torch.ones(1, 3)).sum() * scale
    loss.backward()
    return loss


def test_nan_loss_is_skipped_and_counted() -> None:
    layer, opt = _setup()
    guard = NonFiniteGuard(3)
    before = [p.detach().clone() for p in layer.parameters()]
    out = guarded_step(opt, layer.parameters(), loss=_backward(layer, math.nan), step=0, guard=guard, grad_clip=1.0)
    assert not out.applied and math.isnan(out.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert all(p.grad is None for p in layer.parameters())
    assert guard.total == 1 and guard.in_a_row == 1

    out = guarded_step(opt, layer.parameters(), loss=_backward(layer, 1.0), step=1, guard=guard, grad_clip=1.0)
    assert out.applied and out.grad_norm > 0
    assert not all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert guard.total == 1 and guard.in_a_row == 0 and guard.last_finite_step == 1


def test_infinite_gradient_with_finite_loss_is_skipped() -> None:
    layer, opt = _setup()
    guard = NonFiniteGuard(5)
    loss = _backward(layer, 1.0)
    layer.weight.grad[0, 0] = math.inf
    assert not guarded_step(opt, layer.parameters(), loss=loss, step=3, guard=guard).applied
    assert guard.total == 1


def test_too_many_in_a_row_raise_naming_the_step_and_last_finite_loss() -> None:
    guard = NonFiniteGuard(3)
    assert guard.check(4, torch.tensor(2.5))
    assert not guard.check(5, torch.tensor(math.nan))
    assert not guard.check(6, math.inf)
    with pytest.raises(NonFiniteLossError, match=r"step 7: 3 optimizer steps in a row.*last finite loss was 2\.5 at step 4"):
        guard.check(7, math.nan)
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert restored.total == 3 and restored.last_finite_loss == 2.5
    with pytest.raises(ValueError, match="positive integer"):
        NonFiniteGuard(0)
