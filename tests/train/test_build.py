"""`train.build`: how a recipe's model starts (here: the cross-attention gates of `model.fusion_gate_init`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_llama.adapters.cross_attention import GatedCrossAttentionBlock
from mm_llama.train.stages import build
from mm_llama.train.recipe import RecipeError, load_recipe
from mm_llama.train.trainer import run_training
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401


def _gates(model: torch.nn.Module) -> list[float]:
    blocks = [m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock)]
    return [float(g.detach()) for b in blocks for g in (b.gate_attn, b.gate_ffwd)]


def test_gates_start_at_fusion_gate_init(assets: Assets) -> None:  # noqa: F811
    meta = build(load_recipe("tiny_vision_pretrain", mm_overrides(assets, model__fusion_gate_init=0.0))).model
    assert _gates(meta) == [0.0, 0.0]  # one fusion layer: Meta's identity start
    opened = build(load_recipe("tiny_vision_pretrain", mm_overrides(assets, model__fusion_gate_init=1.5,
                                                                    model__fusion_layers=[0, 1]))).model
    assert _gates(opened) == [1.5] * 4
    # only the gates move: every other weight is what the same seed gives with closed gates
    closed = build(load_recipe("tiny_vision_pretrain", mm_overrides(assets, model__fusion_gate_init=0.0,
                                                                    model__fusion_layers=[0, 1]))).model
    differ = [k for k, v in opened.state_dict().items() if not torch.equal(v, closed.state_dict()[k])]
    assert differ and all(k.endswith(("gate_attn", "gate_ffwd")) for k in differ)


def test_weights_from_init_from_replace_the_gate_init(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2, model__fusion_gate_init=0.5))
    first = run_training(cfg, tmp_path / "first")
    trained = _gates(first.model)
    assert trained != [0.5, 0.5]  # the gates trained
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, model__fusion_gate_init=3.0,
                                                           model__init_from=str(first.run_dir)))
    assert _gates(build(cfg).model) == trained


def test_fusion_gate_init_must_be_finite(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"model\.fusion_gate_init must be a finite number, got inf"):
        load_recipe("tiny_vision_pretrain", ["model.fusion_gate_init=.inf"])


def test_init_from_passes_over_an_unreadable_newest_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mm_llama.checkpoints.state_dict import CheckpointError
    from mm_llama.train.build import adapter_weights_of
    from mm_llama.train.checkpointing import STATE_FILE, TRAINABLE_FILE, checkpoint_name

    for step, value in ((2, 1.0), (4, 2.0)):
        ckpt = tmp_path / checkpoint_name(step)
        ckpt.mkdir()
        (ckpt / STATE_FILE).write_text("{}")
        save_file({"w": torch.full((2,), value)}, str(ckpt / TRAINABLE_FILE))
    newest = tmp_path / checkpoint_name(4) / TRAINABLE_FILE
    newest.write_bytes(newest.read_bytes()[:20])  # truncated
    with pytest.warns(UserWarning, match=f"passing over checkpoint .*{checkpoint_name(4)}.*not a readable safetensors"):
        tensors, source = adapter_weights_of(tmp_path)
    assert source == tmp_path / checkpoint_name(2) / TRAINABLE_FILE and tensors["w"].tolist() == [1.0, 1.0]
    older = tmp_path / checkpoint_name(2) / TRAINABLE_FILE
    older.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none of its checkpoints can be read"):
        adapter_weights_of(tmp_path)
