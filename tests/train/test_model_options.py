"""`train.compile`: every repeated block of an image model is compiled, and the step computes what eager does."""

from __future__ import annotations

import copy

import pytest
import torch

from mm_llama.train.model_options import compile_blocks
from mm_llama.train.tasks import predicting_positions, selected_cross_entropy
from tests.train.helpers import tiny_batch, tiny_model


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                    images) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits = model(tokens, images=images, logits_at=predicting_positions(labels))
    loss, _ = selected_cross_entropy(logits, labels)
    return loss, list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients() -> None:
    """~30 s on 2 CPU cores (inductor builds C++ for three block kinds, forward and backward)."""
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    n_vision = len(compiled.image.encoder.transformer.layers) + len(compiled.image.encoder.global_transformer.layers)
    # 2 decoder layers, 1 cross-attention block, the ViT's local and global layers
    assert compile_blocks(compiled) == 2 + 1 + n_vision
    tokens, labels, images = tiny_batch(batch=2)
    labels = torch.cat([torch.full((2, 1), -100), labels[:, :-1]], 1)
    want_loss, want_grads = _loss_and_grads(eager, tokens, labels, images)
    got_loss, got_grads = _loss_and_grads(compiled, tokens, labels, images)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-4, rtol=1e-5)
    # Fused kernels sum in another order: a summed loss of ~100 leaves fp32 noise of a few 1e-4 (the positional
    # embedding's gate, whose true gradient is ~1e-13 in fp64, gets 2e-5 eager and 3e-4 compiled).
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
