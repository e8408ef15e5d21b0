"""Llama 3 building blocks, named as in Meta's reference (`attention.wq`, `feed_forward.w1`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.attention import attend
from mm_llama.config import LlamaConfig
from mm_llama.kv_cache import KVCache
from mm_llama.rope import apply_rope


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then scaled by `weight` in the input dtype (Meta order)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., D]` → `[..., D]`."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) · w3 x)`."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class LayerContext:
    """Everything a decoder layer needs besides its input; built once per forward pass.

    `extras` carries inputs for layers wrapped by fusion (e.g. cross-attention states); plain text layers
    ignore it.
    """

    cos: torch.Tensor  # [B, T, hd/2]
    sin: torch.Tensor  # [B, T, hd/2]
    mask: torch.Tensor | None  # bool [B, 1, T, Tk], True = may attend
    is_causal: bool
    cache: KVCache | None = None
    cache_start: int | torch.Tensor = 0  # first cache slot written; a tensor `[T]` of slots in static decoding
    extras: dict[str, Any] = field(default_factory=dict)


class SelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_idx, ctx.cache_start, k, v)
        out = attend(q, k, v, mask=ctx.mask, is_causal=ctx.is_causal)
        return self.wo(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: `h = x + attn(norm x)`, `out = h + ffn(norm h)`."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = SelfAttention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))
