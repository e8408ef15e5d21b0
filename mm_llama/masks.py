"""Positions and attention masks for padded, packed and cached decoder inputs."""

from __future__ import annotations

import torch


def positions_within_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at 0 where the document id changes: `[B, T]` → `[B, T]`."""
    idx = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    doc_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - doc_start


def positions_after_padding(valid: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Positions counting only real tokens: `valid [B, T]` (bool) → `[B, T]`, padding clamped to 0."""
    pos = valid.long().cumsum(dim=1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clamp(min=0)


def decoder_mask(
    query_slots: torch.Tensor,
    key_valid: torch.Tensor,
    query_docs: torch.Tensor | None = None,
    key_docs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal mask over slots, with key padding and optional document separation.

    `query_slots [Tq]` are absolute slot indices of the queries, `key_valid [B, Tk]` marks real keys,
    `query_docs [B, Tq]` / `key_docs [B, Tk]` are document ids. Returns bool `[B, 1, Tq, Tk]`, True where a
    query may attend. Every query may attend to its own slot, so padding rows never produce NaN.
    """
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_slots[None, :] <= query_slots[:, None]
    mask = causal[None] & key_valid[:, None, :]
    if query_docs is not None and key_docs is not None:
        mask = mask & (query_docs[:, :, None] == key_docs[:, None, :])
    mask = mask | (key_slots[None, :] == query_slots[:, None])[None]
    return mask[:, None]
