"""One decode step with static shapes (gpt-fast style), run eagerly or through `torch.compile`.

The eager decode path (`LlamaDecoder.forward` with a `KVCache`) slices the cache to its filled length, so
every step has new shapes and builds its masks with host syncs. The step here never changes shape:

- the cache slot it writes is a tensor `slot [1]`; K/V go in with `index_copy_` at that slot;
- attention runs over all `max_len` slots of the cache, masked by `cache.valid` (slots not yet written
  are False), so `[B, H, 1, max_len]` is the same every step;
- RoPE cos/sin are gathered from precomputed tables at each row's tensor position `cache.next_position`;
- cross-attention inputs (image / video K/V computed at prefill, kept in `cache.fusion_state`) are built
  once before the loop (`decode_extras`), not per step.

Nothing in the step reads a tensor on the host, so it compiles to one graph (CUDA graphs with
`mode="reduce-overhead"` on GPU, inductor's default on CPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mm_llama.fusion import CROSS_ATTENTION_KEY
from mm_llama.kv_cache import KVCache
from mm_llama.layers import LayerContext
from mm_llama.model import LlamaDecoder

COMPILE_CACHE_ROUNDING = 64
"""When compiling, cache lengths round up to a multiple of this, so nearby request sizes share one graph."""


@dataclass
class StaticDecode:
    """What every step of one `generate` call shares: the text decoder, its plain token table, RoPE tables
    `cos/sin [max_len, hd/2]` (fp32) and the constant `extras` (cross-attention inputs) of decode steps."""

    decoder: LlamaDecoder
    embedding: nn.Embedding
    cos: torch.Tensor
    sin: torch.Tensor
    extras: dict[str, Any]


def text_decoder(model: nn.Module) -> LlamaDecoder | None:
    """The `LlamaDecoder` a model decodes with (the model itself, or `MultimodalLlama.decoder`); None when
    the model is neither, and so has no static path."""
    decoder = getattr(model, "decoder", model)
    return decoder if isinstance(decoder, LlamaDecoder) else None


def plain_embedding(decoder: LlamaDecoder) -> nn.Embedding:
    """The LM's own token table. Decode inputs are ids the output head produced (or the pad id, checked by
    the caller to be inside the LM vocabulary), never media ids, so a fusion embedding's host-side media
    lookup is not needed."""
    table = decoder.tok_embeddings
    return getattr(table, "embedding", table)


def prepare(model: nn.Module, decoder: LlamaDecoder, cache: KVCache) -> StaticDecode:
    """Build the shared state after prefill: RoPE tables for every slot and the decode `extras`."""
    positions = torch.arange(cache.max_len, device=cache.valid.device)[None]  # [1, max_len]
    cos, sin = decoder.rope(positions)
    decode_extras = getattr(model, "decode_extras", None)
    extras = decode_extras(cache, cache.batch_size) if decode_extras is not None else {}
    return StaticDecode(decoder, plain_embedding(decoder), cos[0], sin[0], extras)


def decode_step(state: StaticDecode, cache: KVCache, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """One token per row at cache slot `slot [1]` (long): `tokens [B]` → next-token logits `[B, V]`.

    Marks the slot valid, writes every layer's K/V there, attends over all `max_len` slots and advances
    `cache.next_position`; `cache.length` (a host int) is the caller's to advance.
    """
    cache.valid.index_fill_(1, slot, True)
    positions = cache.next_position  # [B], each row's RoPE position (padding never advanced it)
    cos, sin = state.cos[positions][:, None], state.sin[positions][:, None]  # [B, 1, hd/2]
    mask = cache.valid[:, None, None, :]  # [B, 1, 1, max_len]
    ctx = LayerContext(cos, sin, mask, False, cache, slot, state.extras)
    h = state.embedding(tokens[:, None])  # [B, 1, D]
    for layer in state.decoder.layers:
        h = layer(h, ctx)
    cache.next_position.add_(1)
    return state.decoder.output(state.decoder.norm(h))[:, 0]


StepFn = Callable[[StaticDecode, KVCache, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.lru_cache(maxsize=None)
def compiled_step(device_type: str) -> StepFn:
    """`decode_step` through `torch.compile`: CUDA graphs (`reduce-overhead`) on CUDA, inductor elsewhere."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_step, mode=mode)


def pin_for_cuda_graphs(state: StaticDecode, cache: KVCache, slot: torch.Tensor) -> None:
    """Mark the tensors a CUDA graph reads or writes in place as static inputs, so replays neither copy
    them (image K/V can be large) nor refuse the in-place cache writes. No guard: a new cache re-records."""
    tensors = [*cache.keys, *cache.values, cache.valid, cache.next_position, slot, state.cos, state.sin]
    for inputs in (state.extras.get(CROSS_ATTENTION_KEY) or {}).values():
        tensors += [t for kv in inputs.kv.values() for t in kv]
    for t in tensors:
        torch._dynamo.mark_static_address(t, guard=False)


def cache_length(needed: int, compile: bool) -> int:
    """Slots to allocate: `needed`, rounded up to `COMPILE_CACHE_ROUNDING` when compiling (fewer shapes)."""
    if not compile:
        return needed
    return -(-needed // COMPILE_CACHE_ROUNDING) * COMPILE_CACHE_ROUNDING
