"""Model options of a run that change how it computes, never what: activation checkpointing and
per-block `torch.compile` (`train.activation_checkpointing`, `train.compile`)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn


def _checkpointed(forward: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each Llama decoder layer in the backward pass (the instance's `forward` is wrapped, so
    state-dict names do not change) and turn on a timm backbone's own block checkpointing. Returns the
    number of decoder layers wrapped."""
    from mm_llama.layers import DecoderLayer

    n = 0
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.forward = functools.partial(_checkpointed, module.forward)  # type: ignore[method-assign]
            n += 1
        elif hasattr(module, "set_grad_checkpointing") and hasattr(module, "blocks"):
            module.set_grad_checkpointing(True)
    return n


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` each repeated block in place (`nn.Module.compile`: names unchanged): decoder layers,
    gated cross-attention blocks, Llama 3.2 Vision ViT layers, timm blocks and their gated layers. Returns
    the number compiled. Blocks of one kind share their compiled code; what compiling buys is the fusion of
    the elementwise work between the matmuls (norms, RoPE, SwiGLU, gates), a quarter of a CPU step."""
    from timm.models.vision_transformer import Block

    from mm_llama.adapters.cross_attention import GatedCrossAttentionBlock
    from mm_llama.encoders.timm_vit import GatedTransformerLayer
    from mm_llama.encoders.vit_layers import VisionBlock
    from mm_llama.layers import DecoderLayer

    kinds = (DecoderLayer, GatedCrossAttentionBlock, VisionBlock, Block, GatedTransformerLayer)
    n = 0
    for module in model.modules():
        if isinstance(module, kinds):
            module.compile()
            n += 1
    return n


__all__ = ["compile_blocks", "enable_activation_checkpointing"]
