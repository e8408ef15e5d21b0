"""RoPE in Meta's layout: adjacent channel pairs rotate by their position's angle, bit for bit the textbook
formula on each pair, forward and backward."""

from __future__ import annotations

import torch

from mm_llama.rope import RotaryEmbedding, apply_rope


def _pairwise(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The formula on strided halves: `(x0·cos − x1·sin, x0·sin + x1·cos)`."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def test_apply_rope_is_the_pairwise_rotation_bit_for_bit_with_equal_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 16, requires_grad=True)
    cos, sin = RotaryEmbedding(16, 500000.0, None)(torch.arange(9)[None].expand(2, -1) * 37)
    out, want = apply_rope(x, cos, sin), _pairwise(x, cos, sin)
    assert torch.equal(out, want)
    grad = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


def test_apply_rope_keeps_pair_norms_and_position_zero() -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(8, 10000.0, None)(torch.arange(5)[None])
    out = apply_rope(x, cos, sin)
    norms = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    assert out.dtype == torch.bfloat16  # rotated in fp32, returned in the input's dtype
    torch.testing.assert_close(norms(out.float()), norms(x.float()), atol=0.02, rtol=0.01)
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # angle 0: unchanged
