"""Checkpoints: atomic writes, keep_last, RNG restore, bit-exact resume of optimizer and scheduler."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama.train.checkpointing import (
    CheckpointingError, capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint, load_trainable_state,
    restore_rng, restore_training_state, save_checkpoint, trainable_state_dict,
)
from mm_llama.train.optim import build_optimizer, build_scheduler
from mm_llama.train.recipe import OptimConfig, ScheduleConfig
from tests.train.helpers import loss_fn, tiny_batch, tiny_model


def _save(run: Path, step: int, keep_last: int = 0, **extra: object) -> Path:
    return save_checkpoint(run, step, trainable_state={"w": torch.full((2,), float(step))}, keep_last=keep_last,
                           data_position={"samples": step * 4}, extra=dict(extra))


def test_a_crashed_save_leaves_no_checkpoint_and_is_cleaned(tmp_path: Path) -> None:
    first = _save(tmp_path, 10)
    crashed = tmp_path / "ckpt-000020.tmp"  # a save killed half way: some files, never renamed
    crashed.mkdir()
    (crashed / "trainable.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == first
    assert not crashed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000010"]
    ckpt = load_checkpoint(tmp_path)  # a run directory means its newest checkpoint
    assert ckpt.step == 10 and ckpt.data_position == {"samples": 40}
    assert torch.equal(ckpt.trainable_state["w"], torch.full((2,), 10.0))


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    _save(tmp_path, 5, keep_last=2, note="again")  # re-saving a step replaces it
    assert load_checkpoint(tmp_path).extra == {"note": "again"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000004", "ckpt-000005"]
    _save(tmp_path, 1_000_000)  # more digits still sort by step
    assert latest_checkpoint(tmp_path).name == "ckpt-1000000"


def test_an_interrupted_resave_is_recovered(tmp_path: Path) -> None:
    path = _save(tmp_path, 7)
    path.rename(tmp_path / "ckpt-000007.old")  # killed between moving the old copy away and the new one in
    assert latest_checkpoint(tmp_path) == path and load_checkpoint(path).step == 7


def test_bad_inputs_are_explained(tmp_path: Path) -> None:
    with pytest.raises(CheckpointingError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, trainable_state={}, extra={"t": torch.ones(1)})
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointingError, match="neither a checkpoint nor a run directory"):
        load_checkpoint(tmp_path)


def test_rng_restore_repeats_the_same_random_numbers() -> None:
    state = capture_rng()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    torch.randn(100), np.random.rand(5), random.random()
    restore_rng(state)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()))  # the data depends on the torch RNG: restoring it matters
    tokens, labels, images = tiny_batch(batch=2, seed=seed)
    loss_fn(model, tokens, labels, images).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()


def _setup(seed: int):
    model = tiny_model(seed=seed)
    opt = build_optimizer(model, OptimConfig(lr={"image.encoder": 1e-3, "image.fusion": 3e-3}, weight_decay=0.1))
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2, total_steps=6, min_lr_ratio=0.1))
    return model, opt, sched


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(123)
    model, opt, sched = _setup(seed=0)
    for _ in range(2):
        _train_step(model, opt, sched)
    save_checkpoint(tmp_path, 2, trainable_state=trainable_state_dict(model), optimizer=opt, scheduler=sched,
                    data_position={"batches": 2})
    for _ in range(2):
        _train_step(model, opt, sched)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}
    lr_after = [g["lr"] for g in opt.param_groups]

    torch.manual_seed(999)  # a fresh process: other RNG state, other random initialisation of the adapters
    resumed, opt2, sched2 = _setup(seed=1)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.step == 2 and ckpt.data_position == {"batches": 2}
    assert set(ckpt.trainable_state) == set(trainable_state_dict(resumed))
    assert not any(k.startswith("decoder.layers.0.attention") for k in ckpt.trainable_state)  # frozen LM not saved
    restore_training_state(ckpt, resumed, opt2, sched2)
    # the frozen LM comes from the same base checkpoint in a real run; here: the same seed-0 weights
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            if not p.requires_grad:
                p.copy_(dict(model.named_parameters())[name])
    for _ in range(2):
        _train_step(resumed, opt2, sched2)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key
    assert [g["lr"] for g in opt2.param_groups] == lr_after


def test_load_trainable_state_rejects_other_trainable_sets() -> None:
    model = tiny_model()
    state = trainable_state_dict(model)
    model.set_trainable(["image.fusion"])
    with pytest.raises(CheckpointingError, match="unexpected"):
        load_trainable_state(model, state)


def test_resume_under_other_flags_is_refused(tmp_path: Path) -> None:
    model, opt, sched = _setup(seed=0)
    save_checkpoint(tmp_path, 1, trainable_state=trainable_state_dict(model), optimizer=opt, scheduler=sched)
    ckpt = load_checkpoint(tmp_path)
    other = tiny_model()
    other_opt = build_optimizer(other, OptimConfig(weight_decay_groups=["weight", "bias"]))
    with pytest.raises(CheckpointingError, match="param groups"):
        restore_training_state(ckpt, other, other_opt)
