"""Step functions: shifted cross-entropy in fp32 summed over labelled tokens, counts, autocast rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_llama.config import preset
from mm_llama.model import LlamaDecoder
from mm_llama.train.tasks import (
    ImageTextTask, LMTask, autocast, label_count, predicting_positions, selected_cross_entropy, shifted_cross_entropy,
    task_for,
)
from mm_llama.data.packed_text import pack_rows
from tests.train.helpers import tiny_batch, tiny_model


def test_shifted_cross_entropy_sums_over_labelled_next_tokens() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 6, 2, -100]])
    loss, n = shifted_cross_entropy(logits, labels)
    manual = [F.cross_entropy(logits[b, t - 1][None], labels[b, t][None]) for b in range(2) for t in range(1, 5)
              if labels[b, t] != -100]
    assert n == label_count(labels) == 5 == len(manual)
    torch.testing.assert_close(loss, torch.stack(manual).sum())
    assert loss.dtype == torch.float32
    loss16, _ = shifted_cross_entropy(logits.to(torch.bfloat16), labels)
    assert loss16.dtype == torch.float32  # computed in fp32 whatever the logits' dtype


def test_predicting_positions_mark_the_positions_before_each_label() -> None:
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 6, 2, -100]])
    expected = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(predicting_positions(labels), expected)


def test_selected_cross_entropy_equals_the_shifted_one_on_full_logits() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 6, 2, -100]])
    full, n_full = shifted_cross_entropy(logits, labels)
    selected, n = selected_cross_entropy(logits[predicting_positions(labels)], labels)
    assert n == n_full == 5
    torch.testing.assert_close(selected, full)
    with pytest.raises(ValueError, match="one row per labelled position"):
        selected_cross_entropy(logits.flatten(0, 1), labels)


def test_image_text_task_loss_and_gradients_equal_the_full_logits_ones() -> None:
    """The task scores logits only at labelled positions; loss and every gradient match the full-logits loss."""
    from mm_llama.data.collate import ImageTextBatch, TextBatch

    tokens, labels, images = tiny_batch(batch=2)
    labels = torch.cat([torch.full((2, 1), -100), labels[:, :-1]], 1)
    labels[0, 5:7] = -100  # a gap, as a prompt inside the sample would leave
    batch = ImageTextBatch(TextBatch(tokens, labels, torch.ones_like(tokens, dtype=torch.bool)), images)
    model = tiny_model()
    task_loss = task_for("vqa", torch.device("cpu"))(model, batch).loss_sum
    task_grads = torch.autograd.grad(task_loss, [p for p in model.parameters() if p.requires_grad])
    full_loss, _ = shifted_cross_entropy(model(tokens, images=images), labels)
    full_grads = torch.autograd.grad(full_loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(task_loss, full_loss)
    for got, want in zip(task_grads, full_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_lm_task_counts_tokens_and_samples() -> None:
    tokens = torch.randint(3, 500, (2, 8))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [4, 4, 4, 4, 5, 5, 5, 5]])
    batch = pack_rows(tokens, docs)
    torch.manual_seed(0)
    model = LlamaDecoder(preset("tiny"))
    task = task_for("lm", torch.device("cpu"))
    assert isinstance(task, LMTask)
    result = task(model, batch)
    assert result.units == task.units(batch) == 2 * 7 - 2  # each row: 7 next-token targets, 1 document start
    assert result.tokens == 16 and result.samples == 2
    logits = model(tokens, document_ids=batch.document_ids)
    expected, _ = shifted_cross_entropy(logits, batch.labels)
    torch.testing.assert_close(result.loss_sum, expected)


def test_image_text_task_runs_the_multimodal_model() -> None:
    from mm_llama.data.collate import ImageTextBatch, TextBatch

    model = tiny_model()
    tokens, labels, images = tiny_batch(batch=2)
    labels = torch.cat([torch.full((2, 1), -100), labels[:, :-1]], 1)  # make them aligned, like the data layer
    batch = ImageTextBatch(TextBatch(tokens, labels, torch.ones_like(tokens, dtype=torch.bool)), images)
    task = task_for("vqa", torch.device("cpu"))
    assert isinstance(task, ImageTextTask)
    result = task(model, batch)
    assert result.units == int((labels[:, 1:] != -100).sum()) and result.samples == 2 and result.tokens == tokens.numel()
    result.loss_sum.backward()
    assert all(p.grad is None for p in model.parameter_groups()["decoder"].values())
    assert any(p.grad is not None for p in model.parameter_groups()["image.fusion"].values())


def test_autocast_only_on_cuda() -> None:
    cpu = torch.device("cpu")
    with autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        autocast(cpu, "bf16")
    with pytest.raises(ValueError, match="no training step"):
        task_for("segmentation", cpu)
    assert type(task_for("video_qa", cpu)).__name__ == "VideoTextTask"
