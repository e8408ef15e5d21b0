"""The speech adapter (paper §8.2, REFERENCE.md §4): Conformer states → LM token embeddings.

    encoder states [B, S, E] (40 ms) → Conv1d k=3 s=2 → [B, ⌈S/2⌉, A] (80 ms, 12.5 per second)
      → one rotary Transformer layer (pre-norm, SwiGLU; over each row's real steps) → Linear → [B, N, D_lm]

Its outputs replace the placeholder span between the speech start and end tokens of the prompt (no
cross-attention). The adapter owns the geometry that says how long that span is: `speech_token_count`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mm_llama.config import LlamaConfig
from mm_llama.layers import DecoderLayer, LayerContext
from mm_llama.rope import RotaryEmbedding

__all__ = ["ENCODER_STACK", "SPEECH_ADAPTER_PRESETS", "SpeechAdapter", "SpeechAdapterConfig", "speech_token_count"]

ENCODER_STACK = 4  # 10 ms log-mel frames per Conformer step (40 ms)
CONV_STRIDE = 2  # Conformer steps per adapter output (80 ms)


def speech_token_count(n_frames: int) -> int:
    """Number of adapter outputs (= speech placeholder tokens) for `n_frames` 10 ms feature frames.

    The encoder stacks 4 frames into one 40 ms step, zero-padding the last partial group (``ceil(n / 4)``);
    the adapter's Conv1d (kernel 3, stride 2, padding 1) halves that, rounding up (``ceil(· / 2)``),
    giving 80 ms per output: 12.5 per second of audio.

    ``ceil(ceil(n_frames / 4) / 2)``: 0 → 0, 1 → 1, 8 → 1, 9 → 2, 100 (1 s) → 13, 6000 (60 s) → 750.
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 0:
        raise ValueError(f"n_frames must be a non-negative int, got {n_frames!r}")
    stacked = -(-n_frames // ENCODER_STACK)
    return -(-stacked // CONV_STRIDE)


@dataclass(frozen=True)
class SpeechAdapterConfig:
    """`dim` / `ffn_dim` / `n_heads` of the adapter's Transformer layer (paper: 3072 / 4096)."""

    dim: int = 3072
    ffn_dim: int = 4096
    n_heads: int = 24
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5


SPEECH_ADAPTER_PRESETS: dict[str, SpeechAdapterConfig] = {
    "paper": SpeechAdapterConfig(),
    "tiny": SpeechAdapterConfig(dim=96, ffn_dim=256, n_heads=4),
}


class SpeechAdapter(nn.Module):
    """Conv1d (k=3, s=2) → one rotary Transformer layer → Linear to the LM width (see the module docstring)."""

    def __init__(self, cfg: SpeechAdapterConfig, encoder_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(encoder_dim, cfg.dim, kernel_size=3, stride=CONV_STRIDE, padding=1)
        layer_cfg = LlamaConfig(dim=cfg.dim, n_layers=1, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, vocab_size=1,
                                ffn_dim=cfg.ffn_dim, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                rope_scaling=None)
        self.layer = DecoderLayer(layer_cfg, 0)
        self.rope = RotaryEmbedding(layer_cfg.head_dim, cfg.rope_theta, None)
        self.proj = nn.Linear(cfg.dim, lm_dim)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`states [B, S, E]` (zero past each row's length), `lengths [B]` encoder steps →
        `(embeddings [B, N, D_lm], lengths [B])` with `N = ⌈S/2⌉`; rows end at `⌈length/2⌉`."""
        real_in = torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]
        x = self.conv((states * real_in[..., None].to(states.dtype)).transpose(1, 2)).transpose(1, 2)  # [B, N, A]
        out_lengths = -(-lengths // CONV_STRIDE)
        steps = x.shape[1]
        real = torch.arange(steps, device=x.device)[None] < out_lengths[:, None]
        positions = torch.arange(steps, device=x.device)[None].expand(x.shape[0], -1)
        cos, sin = self.rope(positions)
        mask = None if bool(real.all()) else real[:, None, None, :]
        x = self.layer(x, LayerContext(cos, sin, mask, False))
        return self.proj(x) * real[..., None].to(x.dtype), out_lengths
