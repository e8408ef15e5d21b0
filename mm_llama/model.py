"""The Llama 3 text decoder: the frozen trunk every modality attaches to."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mm_llama.config import LlamaConfig
from mm_llama.kv_cache import KVCache
from mm_llama.layers import DecoderLayer, LayerContext, RMSNorm
from mm_llama.masks import decoder_mask, positions_after_padding, positions_within_documents
from mm_llama.rope import RotaryEmbedding


def _select_rows(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Hidden states `[B, T, D]` at the True positions of `keep [B, T]` → `[N, D]` (row-major order)."""
    if keep.shape != h.shape[:2] or keep.dtype != torch.bool:
        raise ValueError(f"logits_at must be a bool mask of shape {tuple(h.shape[:2])}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    return h[keep.to(h.device)]


class LlamaDecoder(nn.Module):
    """Llama 3 decoder with Meta's parameter names (`tok_embeddings`, `layers.i.*`, `norm`, `output`).

    What fusion builds on: `tok_embeddings` (replaceable embedding module), `layers` (a ModuleList whose
    entries may be wrapped; each is called as `layer(x, ctx)`), and `LayerContext.extras` to route extra
    inputs to wrapped layers. The decoder itself knows nothing about images, video or speech.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output head with the embedding table when the config says so (Llama 3.2 1B/3B)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype, `max_len` defaulting to `max_seq_len`."""
        param = self.output.weight
        return KVCache(
            len(self.layers), batch_size, max_len or self.cfg.max_seq_len, self.cfg.n_kv_heads,
            self.cfg.head_dim, dtype=param.dtype, device=param.device,
        )

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        extras: dict[str, Any] | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` (or `[B, 1, V]` with `last_only`) for `tokens [B, T]` or `embeds [B, T, D]`.

        `attention_mask [B, T]` marks real tokens (False = padding, which no real token attends to);
        `document_ids [B, T]` separates packed documents (attention stays within a document and
        positions restart at each one); with a `cache`, the new tokens follow the cached ones.
        `logits_at [B, T]` (bool) gives logits `[N, V]` of only its N True positions, in row-major order:
        a training loss needs only the positions that predict a label, so the output head (and its
        backward) skips the rest (`mm_llama.train.tasks.predicting_positions`).
        """
        if last_only and logits_at is not None:
            raise ValueError("pass last_only or logits_at, not both")
        h = self.forward_hidden(
            tokens, embeds=embeds, attention_mask=attention_mask, document_ids=document_ids,
            position_ids=position_ids, cache=cache, extras=extras,
        )
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = _select_rows(h, logits_at)
        return self.output(h)

    def forward_hidden(
        self,
        tokens: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        extras: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states `[B, T, D]`; same arguments as `forward`."""
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens [B, T] or embeds [B, T, D]")
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        ctx = self._context(h, attention_mask, document_ids, position_ids, cache, extras or {})
        for layer in self.layers:
            h = layer(h, ctx)
        if cache is not None:
            cache.advance(self._valid(h, attention_mask))
        return self.norm(h)

    @staticmethod
    def _valid(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return attention_mask.to(device=h.device, dtype=torch.bool)

    def _context(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
        extras: dict[str, Any],
    ) -> LayerContext:
        batch, length = h.shape[:2]
        if length > self.cfg.max_seq_len:
            raise ValueError(
                f"input has {length} positions but the model's max_seq_len is {self.cfg.max_seq_len}; "
                "shorten the input or load the model with a larger max_seq_len"
            )
        valid = self._valid(h, attention_mask)
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids (packed sequences) cannot be combined with a KV cache")
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_within_documents(document_ids)
            elif cache is not None:
                position_ids = positions_after_padding(valid, cache.next_position)
            else:
                position_ids = positions_after_padding(valid)
        cos, sin = self.rope(position_ids.to(h.device))

        start = 0
        if cache is not None:
            if cache.batch_size != batch:
                raise ValueError(f"KV cache was built for batch {cache.batch_size}, input has {batch}")
            start, _ = cache.reserve(valid)
            key_valid = cache.valid[:, : start + length]
        else:
            key_valid = valid
        all_valid = bool(valid.all()) and (cache is None or bool(key_valid.all()))
        if document_ids is None and all_valid and (start == 0 or length == 1):
            # Mask-free fast path: plain causal prefill, or one decode step over an unpadded cache.
            return LayerContext(cos, sin, None, start == 0 and length > 1, cache, start, extras)
        query_slots = torch.arange(start, start + length, device=h.device)
        mask = decoder_mask(query_slots, key_valid, document_ids, document_ids)
        return LayerContext(cos, sin, mask, False, cache, start, extras)
