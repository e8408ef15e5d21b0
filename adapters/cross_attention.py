"""Gated cross-attention block: text hidden states attend to projected vision tokens (REFERENCE.md §2).

`h = x + tanh(gate_attn) · rowmask · CrossAttn(RMSNorm x)`; `out = h + tanh(gate_ffwd) · rowmask · SwiGLU(RMSNorm h)`.
Parameter names follow Meta's `CrossAttentionTransformerBlock` so its checkpoints map one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_llama.attention import attend
from mm_llama.config import LlamaConfig
from mm_llama.layers import FeedForward, RMSNorm


class CrossAttention(nn.Module):
    """GQA cross-attention with per-head RMSNorm on queries and keys, no RoPE, not causal."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def compute_kv(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of vision tokens `[B, S, D]` → two `[B, Hkv, S, hd]` (keys normed)."""
        k = self.wk(vision).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(vision).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        return self.k_norm(k), v

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        row_mask: torch.Tensor,
    ) -> torch.Tensor:
        """`x [B, T, D]`, `kv` from `compute_kv`, `key_mask [B, 1, T, S]` (True = may attend, None = all),
        `row_mask [B, T, 1]` (0 for text rows that see no image) → `[B, T, D]`."""
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        out = attend(self.q_norm(q), kv[0], kv[1], mask=key_mask)
        out = out.transpose(1, 2).flatten(2) * row_mask  # Meta zeroes image-less rows before wo
        return self.wo(out)


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention + SwiGLU FFN, each behind a tanh gate initialised to 0 (identity at init)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention = CrossAttention(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def compute_kv(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention.compute_kv(vision)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
        row_mask: torch.Tensor,
    ) -> torch.Tensor:
        """`x [B, T, D]` → `[B, T, D]`; see `CrossAttention.forward` for the masks."""
        row_mask = row_mask.to(x.dtype)
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, key_mask, row_mask)
        return h + self.gate_ffwd.tanh() * (row_mask * self.feed_forward(self.ffn_norm(h)))
