"""The video temporal aggregator (paper §7.2, REFERENCE.md §3): a perceiver resampler, OpenFlamingo style.

Each group of `S = group_size` consecutive frames of a clip is merged into one aggregated frame of
`L = n_latents` latent tokens. For one group, with `x_j [P, D]` the tokens of its j-th frame:

    media   = concat_j (x_j + time_embed[j] [+ space_embed])              [S·P, D]
    z_0     = latents                                                      [L, D]
    per layer:
      m, l  = norm_media(media), norm_latents(z)
      z    += to_out(softmax(q kᵀ / √head_dim) v),  q = to_q(l),  k, v = to_kv(concat(m, l))
      z    += W_2 GELU(W_1 LayerNorm(z))
    out     = norm(z)                                                      [L, D]

Keys from padded frames are masked out; the group's own latents are always keys, so a group with no
real frame still gives finite latents (flagged False in `group_mask`). All groups of all rows run as
one batch `[B·G, S·P, D]`; no key mask is built when every frame of the batch is real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PERCEIVER_PRESETS", "PerceiverConfig", "PerceiverResampler"]


@dataclass(frozen=True)
class PerceiverConfig:
    """Perceiver depth and attention geometry; `group_size` frames merge into `n_latents` tokens."""

    depth: int = 2
    n_heads: int = 8
    head_dim: int = 64
    n_latents: int = 64
    ffn_mult: int = 4
    group_size: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "norm_eps":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PerceiverConfig: {f.name} must be a positive int, got {value!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"PerceiverConfig: norm_eps must be a positive finite number, got {eps!r}")


PERCEIVER_PRESETS: dict[str, PerceiverConfig] = {
    # 32 frames → 1 aggregated frame of 64 tokens; one layer at the LM width puts the video parameters
    # (with the video blocks) at the paper's 0.6B for 8B and 4.6B for 70B (tests/mm_llama/modalities)
    "paper": PerceiverConfig(depth=1),
    "tiny": PerceiverConfig(depth=1, n_heads=4, head_dim=24, n_latents=16, ffn_mult=2, group_size=8),
}


class PerceiverLayer(nn.Module):
    """One resampler layer: latents attend to (media, latents), then a GELU FFN; both residual."""

    def __init__(self, cfg: PerceiverConfig, dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.norm_media = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.norm_latents = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # keys are the first `inner` outputs, values the rest
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim, eps=cfg.norm_eps),
            nn.Linear(dim, cfg.ffn_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * dim, dim, bias=False),
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """`media [N, M, D]`, `latents [N, L, D]`, `key_mask [N, 1, 1, M + L]` (True = may attend; None = all)
        → latents `[N, L, D]`."""
        normed = self.norm_latents(latents)
        q = self.to_q(normed).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # [N, H, L, hd]
        kv = self.to_kv(torch.cat([self.norm_media(media), normed], dim=1))
        k, v = kv.unflatten(-1, (2, self.n_heads, self.head_dim)).permute(2, 0, 3, 1, 4)  # 2 × [N, H, M + L, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=self.head_dim ** -0.5)
        latents = latents + self.to_out(out.transpose(1, 2).flatten(2))
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """Frames `[B, K, P, D]` → aggregated frames `[B, ⌈K/group_size⌉, n_latents, D]`; see the module docstring."""

    def __init__(self, cfg: PerceiverConfig, dim: int, tokens_per_frame: int | None = None,
                 max_groups: int | None = None) -> None:
        """`tokens_per_frame` (optional): frames always hold this many tokens, and each position among them
        gets a learned embedding (`space_embed [P, dim]`) next to the frame-time one. `max_groups`
        (optional): the output of group g gets a learned `group_embed[g]` (zero at the start), so what reads
        several aggregated frames can tell which came first; clips of more groups are refused."""
        super().__init__()
        if tokens_per_frame is not None and (isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int)
                                             or tokens_per_frame < 1):
            raise ValueError(f"PerceiverResampler: tokens_per_frame must be a positive int or None, got {tokens_per_frame!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"PerceiverResampler: dim must be a positive int, got {dim!r}")
        self.cfg, self.dim = cfg, dim
        # unit scale, as OpenFlamingo's: next to LayerNormed frame tokens, a 0.02-scale time embedding is
        # invisible at the start (a tiny run then mixed a clip's first and last colours)
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, dim))
        self.time_embed = nn.Parameter(torch.randn(cfg.group_size, dim))
        # where a token sits in its frame, learned (`tokens_per_frame`): motion is a change of place over time
        self.space_embed = nn.Parameter(torch.randn(tokens_per_frame, dim)) if tokens_per_frame else None
        self.group_embed = nn.Parameter(torch.zeros(max_groups, dim)) if max_groups else None
        self.layers = nn.ModuleList(PerceiverLayer(cfg, dim) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)

    def _check(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> None:
        if frames.ndim != 4:
            raise ValueError(f"frames must be [B, K, P, dim] (K frames of P tokens), got shape {tuple(frames.shape)}")
        if frames.shape[-1] != self.dim:
            raise ValueError(f"frames have width {frames.shape[-1]} (shape {tuple(frames.shape)}); this resampler "
                             f"was built for dim={self.dim}")
        if frames.shape[1] < 1 or frames.shape[2] < 1:
            raise ValueError(f"frames need at least one frame and one token per frame, got shape {tuple(frames.shape)}")
        if self.group_embed is not None and frames.shape[1] > self.group_embed.shape[0] * self.cfg.group_size:
            raise ValueError(f"a clip of {frames.shape[1]} frames makes more than max_groups="
                             f"{self.group_embed.shape[0]} groups of {self.cfg.group_size}; sample at most "
                             f"{self.group_embed.shape[0] * self.cfg.group_size} frames (data.num_frames / --num-frames)")
        if self.space_embed is not None and frames.shape[2] != self.space_embed.shape[0]:
            raise ValueError(f"frames hold {frames.shape[2]} tokens each (shape {tuple(frames.shape)}); this resampler "
                             f"was built for tokens_per_frame={self.space_embed.shape[0]}")
        if frame_mask.shape != frames.shape[:2]:
            raise ValueError(f"frame_mask must be [B, K] = {tuple(frames.shape[:2])} to match frames "
                             f"{tuple(frames.shape)}, got shape {tuple(frame_mask.shape)}")
        if frame_mask.dtype != torch.bool:
            raise ValueError(f"frame_mask must be bool (True = real frame), got dtype {frame_mask.dtype}")

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`frames [B, K, P, D]`, `frame_mask [B, K]` (True = real frame; padding may hold anything),
        optional `token_mask [B, K, P]` (False on tokens of a real frame that are padding too, such as the
        tiles a smaller frame lacks) → `(out [B, G, L, D], group_mask [B, G])`, `G = ⌈K/group_size⌉`;
        `group_mask` is True where the group holds at least one real frame."""
        self._check(frames, frame_mask)
        if token_mask is not None and (token_mask.shape != frames.shape[:3] or token_mask.dtype != torch.bool):
            raise ValueError(f"token_mask must be a bool [B, K, P] = {tuple(frames.shape[:3])} tensor, got "
                             f"{token_mask.dtype} of shape {tuple(token_mask.shape)}")
        batch, n_frames, tokens, dim = frames.shape
        size = self.cfg.group_size
        groups = -(-n_frames // size)
        # torch.where, not a product: padding holding inf/NaN would otherwise leak through 0 · v.
        keep = frame_mask[:, :, None] if token_mask is None else frame_mask[:, :, None] & token_mask  # [B, K, P]
        frames = torch.where(keep[..., None], frames, frames.new_zeros(()))
        keep = keep.expand(batch, n_frames, tokens)
        pad = groups * size - n_frames
        if pad:
            frames = torch.cat([frames, frames.new_zeros(batch, pad, tokens, dim)], dim=1)
            frame_mask = torch.cat([frame_mask, frame_mask.new_zeros(batch, pad)], dim=1)
            keep = torch.cat([keep, keep.new_zeros(batch, pad, tokens)], dim=1)
        if self.space_embed is not None:
            frames = frames + self.space_embed
        media = (frames.view(batch, groups, size, tokens, dim) + self.time_embed[:, None, :]).reshape(
            batch * groups, size * tokens, dim)
        real = frame_mask.view(batch, groups, size)
        key_mask = None
        if not bool(keep.all()):
            media_keys = keep.reshape(batch * groups, size * tokens)
            latent_keys = media_keys.new_ones(batch * groups, self.cfg.n_latents)
            key_mask = torch.cat([media_keys, latent_keys], dim=1)[:, None, None, :]
        latents = self.latents.expand(batch * groups, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents, key_mask)
        out = self.norm(latents).view(batch, groups, self.cfg.n_latents, dim)
        if self.group_embed is not None:
            out = out + self.group_embed[:groups, None, :]
        return out, real.any(dim=-1)
