"""Pre-norm ViT blocks with optional tanh gates and hidden-state taps (Llama 3.2 Vision layout).

Parameter names follow Hugging Face's Mllama vision layers (`self_attn.q_proj`, `mlp.fc1`,
`input_layernorm`, `gate_attn`, ...) so `vision_model.*` checkpoint keys load unchanged. All attention
goes through `mm_llama.attention.attend`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.attention import attend


class VisionAttention(nn.Module):
    """Multi-head self-attention without biases (`q_proj`, `k_proj`, `v_proj`, `o_proj`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}; pick heads that divide it")
        self.heads = heads
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, S, D]`, `mask` bool broadcastable to `[B, H, S, S]` (True = may attend) → `[B, S, D]`."""
        b, s, d = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        out = attend(q, k, v, mask=mask)  # [B, H, S, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class VisionMLP(nn.Module):
    """`fc2(gelu(fc1 x))` with biases and exact (erf) GELU."""

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S, D]` → `[B, S, D]`."""
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block; gated blocks scale each residual branch by `tanh(gate)`.

    `x += g_a · attn(LN₁ x); x += g_f · mlp(LN₂ x)` with `g = tanh(gate)` when gated, else 1.
    Gates start at 0 (Meta's initialisation: a freshly added gated block is the identity).
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, norm_eps: float, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(width, heads)
        self.mlp = VisionMLP(width, mlp_dim)
        self.input_layernorm = nn.LayerNorm(width, eps=norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(width, eps=norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, S, D]`, `mask` as in `VisionAttention` → `[B, S, D]`."""
        h = self.self_attn(self.input_layernorm(x), mask)
        if self.gated:
            h = self.gate_attn.tanh() * h
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.gated:
            h = self.gate_ffn.tanh() * h
        return x + h


class VisionLayerStack(nn.Module):
    """A stack of `VisionBlock`s (`layers.i.*`) that can return the hidden states entering chosen layers."""

    def __init__(
        self, n_layers: int, width: int, heads: int, mlp_dim: int, norm_eps: float, gated: bool = False
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            VisionBlock(width, heads, mlp_dim, norm_eps, gated=gated) for _ in range(n_layers)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, taps: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`x [B, S, D]` → (`[B, S, D]`, one `[B, S, D]` per entry of `taps`, in `taps` order).

        Tap `i` is the hidden state **entering** layer `i` (0-based), as in Meta's reference.
        """
        for i in taps:
            if not 0 <= i < len(self.layers):
                raise ValueError(f"tap layer {i} is outside 0..{len(self.layers) - 1}")
        wanted = set(taps)
        entering: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in wanted:
                entering[i] = x
            x = layer(x, mask)
        return x, [entering[i] for i in taps]
