"""Fusion wraps, never edits: cross-attention before chosen decoder layers, extra embedding rows.

State-dict hooks keep the wrapped modules' original keys (`layers.3.attention.wq.weight`,
`tok_embeddings.weight`), so an unmodified Llama checkpoint loads into a fused decoder and adapter
weights live under their own names, one set per modality (`layers.3.fusion.image.*`,
`tok_embeddings.media.image.weight`), so each modality can train or stay frozen on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mm_llama.layers import LayerContext

CROSS_ATTENTION_KEY = "cross_attention"  # LayerContext.extras entry: {modality name: CrossAttentionInputs}


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
    `kv` maps a fusion layer's id to its keys/values, filled on first use and reused while decoding;
    `decode_keys [B, S]` (optional) is the key mask of the last prompt row, what every decoded token sees.
    """

    vision: torch.Tensor | None
    key_mask: torch.Tensor | None
    row_mask: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    decode_keys: torch.Tensor | None = None


class FusionLayer(nn.Module):
    """Runs named gated cross-attention blocks, in their given order, before `layer` (Meta order).

    `fusion` is a `ModuleDict` keyed by modality name (`layers.i.fusion.video.*` before
    `layers.i.fusion.image.*` when built in that order). A block runs only when the context carries
    cross-attention inputs for its modality; without any (text-only batches) the layer behaves exactly
    like the plain decoder layer.
    """

    def __init__(self, layer: nn.Module, blocks: dict[str, nn.Module]) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a FusionLayer needs at least one cross-attention block")
        self.layer = layer
        self.fusion = nn.ModuleDict(blocks)
        self.layer_idx = getattr(layer, "layer_idx", None)
        self.register_state_dict_post_hook(_rename_on_save("layer"))
        self.register_load_state_dict_pre_hook(_rename_on_load("layer", ("fusion",)))

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """`[B, T, D]` → `[B, T, D]`."""
        per_modality: dict[str, CrossAttentionInputs] = ctx.extras.get(CROSS_ATTENTION_KEY) or {}
        for name, block in self.fusion.items():
            inputs = per_modality.get(name)
            if inputs is None:
                continue
            kv = inputs.kv.get(self.layer_idx)
            if kv is None:
                if inputs.vision is None:
                    raise ValueError(
                        f"fusion layer {self.layer_idx} has no cached {name} keys/values and no {name} tokens"
                    )
                kv = inputs.kv[self.layer_idx] = block.compute_kv(inputs.vision)
            x = block(x, kv, inputs.key_mask, inputs.row_mask)
        return self.layer(x, ctx)


class FusionEmbedding(nn.Module):
    """A frozen token table plus one small trainable table per modality for its media ids.

    `owners` maps a modality name to the ids it owns (all `>= vocab_size`, e.g. `<|image|>` = 128256);
    `media.<name>.weight [len(ids), D]` holds their rows in that order. The table keeps its checkpoint
    key (`weight`); an id past the vocabulary that no modality owns is an error naming it.
    """

    def __init__(self, embedding: nn.Embedding, owners: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.embedding = embedding
        self.vocab_size = embedding.num_embeddings
        self.owned_ids = {name: tuple(ids) for name, ids in owners.items()}
        bad = sorted(i for ids in self.owned_ids.values() for i in ids if i < self.vocab_size)
        if bad:
            raise ValueError(f"media token ids {bad} fall inside the LM's vocabulary of {self.vocab_size}")
        weight = embedding.weight
        self.media = nn.ModuleDict({
            name: nn.Embedding(len(ids), embedding.embedding_dim, device=weight.device, dtype=weight.dtype)
            for name, ids in self.owned_ids.items()
        })
        for table in self.media.values():
            nn.init.normal_(table.weight, std=1.0 / math.sqrt(embedding.embedding_dim))
        self.register_state_dict_post_hook(_rename_on_save("embedding"))
        self.register_load_state_dict_pre_hook(_rename_on_load("embedding", ("media",)))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (what a tied output head shares)."""
        return self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, T]` ids → `[B, T, D]`."""
        is_new = tokens >= self.vocab_size
        old = self.embedding(tokens.clamp(max=self.vocab_size - 1))
        if not bool(is_new.any()):
            return old
        out, covered = old, torch.zeros_like(is_new)
        for name, ids in self.owned_ids.items():
            table_ids = torch.tensor(ids, device=tokens.device)
            hit = tokens[..., None] == table_ids  # [B, T, n_ids]
            mine = hit.any(dim=-1)
            if bool(mine.any()):
                rows = self.media[name](hit.to(torch.long).argmax(dim=-1)).to(old.dtype)
                out = torch.where(mine[..., None], rows, out)
                covered |= mine
        stray = is_new & ~covered
        if bool(stray.any()):
            b, t = (int(i) for i in stray.nonzero()[0])
            raise ValueError(
                f"token id {int(tokens[b, t])} (sample {b}, position {t}) is past the LM's vocabulary of "
                f"{self.vocab_size} but no modality of this model owns it (owned: {self.owned_ids}); "
                "build the model with the modality that uses it, or remove the token"
            )
        return out


def fusion_schedule(n_layers: int, n_fusion: int) -> list[int]:
    """Meta's evenly spread cross-attention positions, counted from the top: 32 layers, 8 → [3, 7, …, 31]."""
    if not 0 < n_fusion <= n_layers:
        raise ValueError(f"cannot place {n_fusion} cross-attention layers in a {n_layers}-layer decoder")
    step = math.ceil(n_layers / n_fusion)
    return list(range(n_layers))[::-1][::step][:n_fusion][::-1]
