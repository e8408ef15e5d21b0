"""The one attention entry point every attention in mm-llama goes through.

CPU: torch SDPA, fp32-exact. CUDA: SDPA with the cuDNN backend preferred on Hopper (sm90+) and the
flash backend elsewhere; the `flash_attn` package is used for mask-free half-precision calls when it is
importable. Masks cost a lot on GPU (DESIGN.md), so callers pass `mask=None` whenever semantics allow.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@functools.lru_cache(maxsize=1)
def _flash_attn_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_func  # optional extra: `pip install mm-llama[flash]`
    except ImportError:
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=8)
def _cuda_backends(device_index: int) -> list[SDPBackend]:
    major, _ = torch.cuda.get_device_capability(device_index)
    if major >= 9:  # Hopper and newer: cuDNN attention is the fastest SDPA kernel (DESIGN.md figures)
        first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    else:
        first = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    return first + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q `[B, Hq, Tq, hd]`, k/v `[B, Hkv, Tk, hd]` with `Hq % Hkv == 0`; `mask` is boolean, True where a
    query may attend, broadcastable to `[B, Hq, Tq, Tk]`. `is_causal` (top-left aligned) needs
    `Tq == Tk` and no mask. Returns `[B, Hq, Tq, hd]`.
    """
    if is_causal and (mask is not None or q.shape[-2] != k.shape[-2]):
        raise ValueError(
            f"is_causal needs no mask and equal query/key lengths (got Tq={q.shape[-2]}, "
            f"Tk={k.shape[-2]}, mask={'set' if mask is not None else 'None'}); pass an explicit mask"
        )
    gqa = q.shape[1] != k.shape[1]
    # Under torch.compile (the static decode step) inductor picks the kernel; no backend context to trace.
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    flash = _flash_attn_func()
    if flash is not None and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal, softmax_scale=scale)
        return out.transpose(1, 2)
    with sdpa_kernel(_cuda_backends(q.device.index or 0), set_priority=True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
