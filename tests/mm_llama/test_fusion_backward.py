"""No backward below the lowest trainable layer: the frozen LM layers under the first cross-attention layer
join the backward pass only when the `<|image|>` embedding row trains (the recipes' `image.fusion` does, as
Meta's learnable rows are trained); with that row frozen, autograd never reaches them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.train.helpers import tiny_batch, tiny_model


def _layer_outputs_need_grad(model: nn.Module, tokens: torch.Tensor, images) -> tuple[list[bool], torch.Tensor]:
    """Whether each decoder layer's output is in the autograd graph, and the loss of that forward pass."""
    flags: list[bool] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: flags.append(out.requires_grad))
             for layer in model.decoder.layers]
    try:
        logits = model(tokens, images=images)
    finally:
        for h in hooks:
            h.remove()
    return flags, F.cross_entropy(logits.flatten(0, 1), tokens.clamp(max=logits.shape[-1] - 1).flatten())


def test_frozen_image_row_keeps_the_layers_below_the_first_fusion_layer_out_of_backward() -> None:
    model = tiny_model()
    row = model.decoder.tok_embeddings.media["image"].weight
    row.requires_grad_(False)
    tokens, _, images = tiny_batch(batch=2)
    first_fusion = min(model.image.fusion_layers)
    assert first_fusion >= 1  # the tiny model has a frozen layer below its cross-attention
    flags, loss = _layer_outputs_need_grad(model, tokens, images)
    assert flags == [i >= first_fusion for i in range(len(flags))]

    # The trained parameters' gradients are exactly those of a run whose lower layers run without autograd.
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trained)
    lower = model.decoder.layers[:first_fusion]
    originals = [layer.forward for layer in lower]
    for layer, forward in zip(lower, originals):
        layer.forward = torch.no_grad()(forward)
    try:
        _, loss_no_grad = _layer_outputs_need_grad(model, tokens, images)
    finally:
        for layer, forward in zip(lower, originals):
            layer.forward = forward
    torch.testing.assert_close(loss_no_grad, loss, atol=0, rtol=0)
    for got, want in zip(torch.autograd.grad(loss_no_grad, trained), grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_trained_image_row_needs_the_backward_of_every_layer_below() -> None:
    model = tiny_model()  # image.encoder + image.fusion, the recipes' set: the <|image|> row trains
    row = model.decoder.tok_embeddings.media["image"].weight
    assert row.requires_grad
    tokens, _, images = tiny_batch(batch=2)
    flags, loss = _layer_outputs_need_grad(model, tokens, images)
    assert all(flags)
    loss.backward()
    assert row.grad is not None and row.grad[0].abs().sum() > 0  # row 0 is <|image|>, present in every sample
