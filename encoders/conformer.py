"""The Conformer speech encoder of Llama 3's speech model (paper §8.1, REFERENCE.md §4).

    log-mel [B, F, 80] (10 ms) → normalise (mean / std buffers saved with the encoder)
      → stack 4 frames [B, ⌈F/4⌉, 320] (40 ms; the last group zero-padded) → Linear → [B, S, D]
      → N × Conformer layer → [B, S, D]

    Conformer layer (pre-norm, Macaron):  x += ½·FFN(LN x);  x += RoPE-MHSA(LN x);  x += Conv(LN x);
                                          x += ½·FFN(LN x);  x = LN x
    Conv module: pointwise (D → 2D) → GLU → zero the padded frames → depthwise k=7 → LayerNorm over the
                 channels of each frame → SiLU → pointwise (D → D)

Padded frames never reach a real one: attention masks them as keys, the depthwise convolution sees them
as zeros (as it sees the zero padding past the end of an utterance), and every norm is per frame. So an
utterance's output is the same alone and in a batch of longer ones (no BatchNorm anywhere). Attention
goes through the project's one entry point (`mm_llama.attention.attend`) with a key padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.attention import attend
from mm_llama.encoders.audio_features import N_MELS
from mm_llama.rope import RotaryEmbedding, apply_rope

__all__ = ["CONFORMER_PRESETS", "ConformerConfig", "ConformerEncoder", "ConformerLayer", "stack_frames"]


@dataclass(frozen=True)
class ConformerConfig:
    """Shape of a Conformer encoder: `n_mels` features per 10 ms frame, `stack` frames per encoder step
    (4: 40 ms), width `dim`, `n_layers` layers of `n_heads` rotary attention heads, FFN width `ffn_dim`,
    depthwise kernel `conv_kernel`."""

    n_mels: int = N_MELS
    stack: int = 4
    dim: int = 1536
    n_layers: int = 24
    n_heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 7
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        positive = {k: getattr(self, k) for k in ("n_mels", "stack", "dim", "n_layers", "n_heads", "ffn_dim", "conv_kernel")}
        bad = {k: v for k, v in positive.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"ConformerConfig: {bad} must be positive integers")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"ConformerConfig: dim {self.dim} must split into {self.n_heads} heads of an even width "
                             "(rotary embeddings rotate channel pairs)")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"ConformerConfig: conv_kernel must be odd (a centred depthwise kernel), got {self.conv_kernel}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFORMER_PRESETS: dict[str, ConformerConfig] = {
    "paper": ConformerConfig(),  # 24 layers, dim 1536, FFN 4096, 24 heads: about 1B parameters
    "tiny": ConformerConfig(dim=96, n_layers=4, n_heads=4, ffn_dim=256),
}


def stack_frames(features: torch.Tensor, lengths: torch.Tensor, stack: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`features [B, F, C]`, `lengths [B]` (real frames per row) → `[B, ⌈F/stack⌉, stack·C]` and the
    stacked lengths `⌈lengths/stack⌉`. Frames past a row's length are zeroed first, so a partial last
    group is zero-padded whatever the batch's padding held."""
    batch, frames, channels = features.shape
    real = torch.arange(frames, device=features.device)[None] < lengths[:, None]
    features = features * real[..., None].to(features.dtype)
    groups = -(-frames // stack)
    features = F.pad(features, (0, 0, 0, groups * stack - frames))
    return features.reshape(batch, groups, stack * channels), -(-lengths // stack)


class _FeedForward(nn.Sequential):
    """LayerNorm → Linear → SiLU → Linear: `[B, S, D]` → `[B, S, D]` (half of it is added: Macaron)."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))


class _SelfAttention(nn.Module):
    """Rotary multi-head self-attention over the real frames of each row."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """`x [B, S, D]`, `cos/sin [B, S, hd/2]`, `key_mask [B, 1, 1, S]` (True = real frame) → `[B, S, D]`."""
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.n_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask=key_mask)
        return self.out(out.transpose(1, 2).flatten(2))


class _ConvModule(nn.Module):
    """Pointwise → GLU → depthwise → per-frame LayerNorm → SiLU → pointwise, padded frames zeroed first."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.pointwise_in = nn.Conv1d(cfg.dim, 2 * cfg.dim, 1)
        self.depthwise = nn.Conv1d(cfg.dim, cfg.dim, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=cfg.dim)
        self.depthwise_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.pointwise_out = nn.Conv1d(cfg.dim, cfg.dim, 1)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`x [B, S, D]`, `real [B, S]` (True = real frame) → `[B, S, D]`."""
        h = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)  # [B, D, S]
        h = self.depthwise(h * real[:, None].to(h.dtype))
        h = F.silu(self.depthwise_norm(h.transpose(1, 2)))  # [B, S, D]
        return self.pointwise_out(h.transpose(1, 2)).transpose(1, 2)


class ConformerLayer(nn.Module):
    """One Conformer layer (see the module docstring): `[B, S, D]` → `[B, S, D]`."""

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.ffn1 = _FeedForward(cfg.dim, cfg.ffn_dim, cfg.norm_eps)
        self.attention = _SelfAttention(cfg)
        self.conv = _ConvModule(cfg)
        self.ffn2 = _FeedForward(cfg.dim, cfg.ffn_dim, cfg.norm_eps)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, real: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attention(x, cos, sin, key_mask)
        x = x + self.conv(x, real)
        x = x + 0.5 * self.ffn2(x)
        return self.norm(x)


class ConformerEncoder(nn.Module):
    """Log-mel features → Conformer states, one per 40 ms (see the module docstring).

    `feature_mean` / `feature_std` `[n_mels]` are buffers (saved in the state dict, never trained):
    the statistics the features are normalised with, by default 0 / 1 until `set_feature_stats` sets
    those of the training data.
    """

    def __init__(self, cfg: ConformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("feature_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("feature_std", torch.ones(cfg.n_mels))
        self.input = nn.Linear(cfg.stack * cfg.n_mels, cfg.dim)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, None)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use `mean` / `std` `[n_mels]` (e.g. over the training set's frames) to normalise features."""
        if mean.shape != (self.cfg.n_mels,) or std.shape != (self.cfg.n_mels,) or bool((std <= 0).any()):
            raise ValueError(f"feature statistics must be [{self.cfg.n_mels}] each with std > 0, got "
                             f"{tuple(mean.shape)} / {tuple(std.shape)}")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """`[..., n_mels]` → normalised with the stored statistics."""
        return (features - self.feature_mean) / self.feature_std

    def stacked(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features [B, F, n_mels]` (raw log-mel), `lengths [B]` → normalised, stacked frames
        `[B, S, stack·n_mels]` and the stacked lengths `[B]` (what BEST-RQ quantizes and masks)."""
        return stack_frames(self.normalize(features), lengths, self.cfg.stack)

    def embed(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features [B, F, n_mels]` (raw log-mel), `lengths [B]` → stacked input states `[B, S, D]` and the
        stacked lengths `[B]`."""
        stacked, stacked_lengths = self.stacked(features, lengths)
        return self.input(stacked), stacked_lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, *, embedded: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`features [B, F, n_mels]` (raw log-mel, 10 ms frames), `lengths [B]` real frames per row →
        `(states [B, S, D], stacked lengths [B])`, `S = ⌈F/4⌉`; states past a row's length are zero.
        `embedded` (optional, `[B, S, D]`) replaces `embed(features)`'s states (BEST-RQ feeds masked ones)."""
        if features.dim() != 3 or features.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"features must be [batch, frames, {self.cfg.n_mels}], got {tuple(features.shape)}")
        if lengths.shape != features.shape[:1] or bool((lengths < 1).any()) or bool((lengths > features.shape[1]).any()):
            raise ValueError(f"lengths must give 1..{features.shape[1]} real frames for each of the {features.shape[0]} "
                             f"rows, got {lengths.tolist()}")
        x, out_lengths = self.embed(features, lengths)
        if embedded is not None:
            x = embedded
        steps = x.shape[1]
        real = torch.arange(steps, device=x.device)[None] < out_lengths[:, None]  # [B, S]
        key_mask = None if bool(real.all()) else real[:, None, None, :]
        positions = torch.arange(steps, device=x.device)[None].expand(x.shape[0], -1)
        cos, sin = self.rope(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, real, key_mask)
        return x * real[..., None].to(x.dtype), out_lengths
