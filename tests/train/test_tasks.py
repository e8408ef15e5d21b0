"""Step functions: shifted cross-entropy in fp32 summed over labelled tokens, counts, autocast rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_llama.config import preset
from mm_llama.model import LlamaDecoder
from mm_llama.train.tasks import (
    ImageTextTask, LMTask, autocast, label_count, shifted_cross_entropy, task_for,
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
