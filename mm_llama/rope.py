"""Rotary position embeddings in Meta's layout (adjacent channel pairs rotate together)."""

from __future__ import annotations

import math

import torch

from mm_llama.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies `[head_dim/2]` (fp32), with Llama 3.1 scaling when `scaling` is set."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


class RotaryEmbedding:
    """Computes cos/sin tables for given positions; holds no parameters or state-dict entries.

    Kept out of `nn.Module` buffers on purpose: the tables stay fp32 whatever dtype the model is cast to,
    and a model built on the meta device needs no re-initialisation after loading.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions [B, T]` (int) → `(cos, sin)`, each `[B, T, head_dim/2]` in fp32."""
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device[positions.device] = self.inv_freq.to(positions.device)
        angles = positions.float()[..., None] * inv_freq
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, H, T, hd]` by `cos/sin [B, T, hd/2]`; channel pairs (2i, 2i+1) rotate together.

    `(x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin)`, computed as `x·cos' + swap(x)·sin'` on whole contiguous
    tensors (`cos'` = each cos twice, `sin'` = (−sin, sin) per pair): the same products and sums, so the
    same bits, as rotating strided halves, at about half the time forward and backward.
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x1, x0) per pair
    cos2 = cos.repeat_interleave(2, dim=-1)[:, None]  # [B, 1, T, hd]
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)[:, None]
    return (xf * cos2 + swapped * sin2).type_as(x)
