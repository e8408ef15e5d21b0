"""LoRA on the frozen LM (issue 17.4) on tiny models, without the trainer: a fresh LoRA model is the base
model exactly; training the `lora` group moves nothing else; merging folds the update into plain weights;
bad settings are errors that name the value."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mm_llama import preset
from mm_llama.adapters.lora import (
    LoraConfig, LoraLinear, apply_lora, has_lora, lora_config_of, merge_lora, merged_copy,
)
from mm_llama.model import LlamaDecoder
from mm_llama.trainable import LORA_GROUP
from mm_llama.train.recipe_sections import LORA_GROUP as RECIPE_LORA_GROUP
from tests.train.helpers import tiny_batch, tiny_model

CFG = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "w2"))


def _logits(model: nn.Module, batch) -> torch.Tensor:
    tokens, _, images = batch
    with torch.no_grad():
        return model(tokens, images=images)


def _trained_lora_model(steps: int = 3) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A tiny image model with LoRA on wq/wv/w2, `steps` AdamW steps on the `lora` group only; returns it
    with its state before and after (clones)."""
    model = tiny_model()
    apply_lora(model, CFG)
    model.set_trainable([LORA_GROUP])
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, labels, images = tiny_batch()
    for _ in range(steps):
        logits = model(tokens, images=images)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.eval(), before, after


def test_a_fresh_lora_model_gives_exactly_the_base_logits() -> None:
    base = tiny_model().eval()
    lora = copy.deepcopy(base)
    wrapped = apply_lora(lora, CFG)
    # 2 tiny decoder layers × 3 targets, the fused layer 1 included; the fusion blocks are not touched
    assert len(wrapped) == 6 and "decoder.layers.1.layer.attention.wq" in wrapped
    assert not any("fusion" in name for name in wrapped)
    batch = tiny_batch()
    assert torch.equal(_logits(lora, batch), _logits(base, batch))
    text = LlamaDecoder(preset("tiny"))
    text_lora = copy.deepcopy(text)
    apply_lora(text_lora, LoraConfig(targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")))
    tokens = torch.randint(0, text.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(text_lora(tokens), text(tokens))


def test_lora_keeps_the_lm_keys_and_adds_its_own_group() -> None:
    model = tiny_model()
    keys_before = set(model.state_dict())
    apply_lora(model, CFG)
    keys = set(model.state_dict())
    added = keys - keys_before
    assert keys_before <= keys  # the LM's checkpoint keys are unchanged
    assert added == {f"decoder.layers.{i}.{m}.lora_{ab}.weight" for i in (0, 1)
                     for m in ("attention.wq", "attention.wv", "feed_forward.w2") for ab in "ab"}
    groups = model.parameter_groups()
    assert list(groups) == ["image.encoder", "image.fusion", "decoder", LORA_GROUP]
    assert {f"{n}" for n in groups[LORA_GROUP]} == {k.replace("layers.1.", "layers.1.layer.") for k in added}
    assert RECIPE_LORA_GROUP == LORA_GROUP  # the recipe's copy of the name (kept torch-free) agrees
    wq = model.decoder.layers[0].attention.wq
    assert isinstance(wq, LoraLinear) and wq.lora_a.weight.shape == (4, 64) and not wq.lora_b.weight.any()
    assert lora_config_of(model) == LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv", "w2"))


def test_training_the_lora_group_changes_only_lora_weights() -> None:
    _, before, after = _trained_lora_model()
    lora_keys = {k for k in before if ".lora_" in k}
    assert lora_keys
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and set(changed) <= lora_keys, set(changed) - lora_keys
    assert all(not torch.equal(before[k], after[k]) for k in lora_keys if ".lora_b." in k)  # every B moved


def test_merge_gives_the_trained_lora_logits_with_plain_weights() -> None:
    model, _, _ = _trained_lora_model()
    batch = tiny_batch(seed=1)
    expected = _logits(model, batch)
    base_keys = {k for k in model.state_dict() if ".lora_" not in k}
    copied = merged_copy(model)
    assert has_lora(model) and not has_lora(copied)  # the original keeps training unmerged
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=0)
    assert merge_lora(model) == 6 and not has_lora(model)
    assert set(model.state_dict()) == base_keys
    merged = _logits(model, batch)
    assert not torch.equal(merged, _logits(tiny_model().eval(), batch))  # the update is really in the weights
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(copied, batch), merged, rtol=0, atol=0)
    assert merge_lora(model) == 0


@pytest.mark.parametrize(("fields", "named"), [
    ({"rank": 0}, "rank must be a whole number >= 1, got 0"),
    ({"rank": -2}, "got -2"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
    ({"dropout": 1.0}, "dropout must lie in [0, 1), got 1.0"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"ranks": 4}, "unknown LoRA setting(s) ['ranks']"),
])
def test_bad_settings_name_the_value(fields: dict, named: str) -> None:
    with pytest.raises(ValueError) as err:
        LoraConfig.from_fields(fields)
    assert named in str(err.value)


def test_an_unknown_target_names_it_and_the_layers_that_exist() -> None:
    model = tiny_model()
    with pytest.raises(ValueError) as err:
        apply_lora(model, LoraConfig(targets=("wq", "qkv_proj")))
    message = str(err.value)
    assert "'qkv_proj' matches no linear layer" in message
    assert "attention.wq" in message and "q_proj" in message and "w3" in message
    assert not has_lora(model)  # nothing was wrapped
    apply_lora(model, CFG)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, CFG)
