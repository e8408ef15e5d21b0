"""Fusion wraps, never edits: cross-attention before chosen decoder layers, extra embedding rows.

State-dict hooks keep the wrapped modules' original keys (`layers.3.attention.wq.weight`,
`tok_embeddings.weight`), so an unmodified Llama checkpoint loads into a fused decoder and adapter
weights live under their own names (`layers.3.fusion.*`, `tok_embeddings.fusion_embedding.weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mm_llama.layers import LayerContext

CROSS_ATTENTION_KEY = "cross_attention"  # LayerContext.extras entry read by fusion layers


def _rename_on_save(inner: str):
    """State-dict post-hook that drops `inner.` from the keys of the wrapped module."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + inner + ".")]:
            state_dict[prefix + key[len(prefix + inner) + 1:]] = state_dict.pop(key)

    return hook


def _rename_on_load(inner: str, own: tuple[str, ...]):
    """Load pre-hook that puts `inner.` back in front of every key that is not one of `own`'s."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if not rest.startswith(tuple(f"{name}." for name in (inner, *own))):
                state_dict[prefix + inner + "." + rest] = state_dict.pop(key)

    return hook


@dataclass
class CrossAttentionInputs:
    """What fusion layers need for one forward pass (carried in `LayerContext.extras`).

    `vision [B, S, D]` are projected vision tokens (None when every layer's K/V is already in `kv`);
    `key_mask [B, 1, T, S]` / `row_mask [B, T, 1]` come from `cross_attention_mask.attention_masks`;
    `kv` maps a fusion layer's id to its keys/values, filled on first use and reused while decoding.
    """

    vision: torch.Tensor | None
    key_mask: torch.Tensor | None
    row_mask: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class FusionLayer(nn.Module):
    """Runs `fusion` (a gated cross-attention block) before `layer` (Meta order).

    Without cross-attention inputs in the context (text-only batches) the fusion block is skipped, so the
    layer behaves exactly like the plain decoder layer.
    """

    def __init__(self, layer: nn.Module, fusion: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.fusion = fusion
        self.layer_idx = getattr(layer, "layer_idx", None)
        self.register_state_dict_post_hook(_rename_on_save("layer"))
        self.register_load_state_dict_pre_hook(_rename_on_load("layer", ("fusion",)))

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        inputs: CrossAttentionInputs | None = ctx.extras.get(CROSS_ATTENTION_KEY)
        if inputs is not None:
            kv = inputs.kv.get(self.layer_idx)
            if kv is None:
                if inputs.vision is None:
                    raise ValueError(
                        f"fusion layer {self.layer_idx} has no cached image keys/values and no vision tokens"
                    )
                kv = inputs.kv[self.layer_idx] = self.fusion.compute_kv(inputs.vision)
            x = self.fusion(x, kv, inputs.key_mask, inputs.row_mask)
        return self.layer(x, ctx)


class FusionEmbedding(nn.Module):
    """A frozen token table plus `n_new` trainable rows for ids `vocab_size .. vocab_size + n_new − 1`.

    Keeps the table's checkpoint key (`weight`); the new rows are `fusion_embedding.weight`.
    """

    def __init__(self, embedding: nn.Embedding, n_new: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.vocab_size = embedding.num_embeddings
        self.fusion_embedding = nn.Embedding(n_new, embedding.embedding_dim,
                                             device=embedding.weight.device, dtype=embedding.weight.dtype)
        nn.init.normal_(self.fusion_embedding.weight, std=1.0 / math.sqrt(embedding.embedding_dim))
        self.register_state_dict_post_hook(_rename_on_save("embedding"))
        self.register_load_state_dict_pre_hook(_rename_on_load("embedding", ("fusion_embedding",)))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (what a tied output head shares)."""
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size + self.fusion_embedding.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, T]` ids → `[B, T, D]`."""
        is_new = tokens >= self.vocab_size
        old = self.embedding(tokens.clamp(max=self.vocab_size - 1))
        if not bool(is_new.any()):
            return old
        new = self.fusion_embedding((tokens - self.vocab_size).clamp(min=0)).to(old.dtype)
        return torch.where(is_new[..., None], new, old)


def fusion_schedule(n_layers: int, n_fusion: int) -> list[int]:
    """Meta's evenly spread cross-attention positions, counted from the top: 32 layers, 8 → [3, 7, …, 31]."""
    if not 0 < n_fusion <= n_layers:
        raise ValueError(f"cannot place {n_fusion} cross-attention layers in a {n_layers}-layer decoder")
    step = math.ceil(n_layers / n_fusion)
    return list(range(n_layers))[::-1][::step][:n_fusion][::-1]
