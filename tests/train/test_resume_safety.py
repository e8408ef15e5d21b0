"""Issue 11: `--resume` refuses a recipe that differs from the checkpoint's (config.yaml never disagrees
with what runs), applies and logs only settings that are safe to change, and falls back past a corrupt
newest checkpoint to the newest intact one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mm_llama.commands import train
from mm_llama.train.checkpointing import STATE_FILE, TRAINABLE_FILE, list_checkpoints, save_checkpoint
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401


def _train(a: Assets, out: Path, *extra: str, steps: int = 2, resume: bool = False) -> int:
    """`extra` overrides replace `mm_overrides`' value of their key (a key given twice is refused)."""
    given = dict(o.split("=", 1) for o in extra)
    base = [o for o in mm_overrides(a, steps=steps) if o.split("=", 1)[0] not in given]
    args = ["tiny_vision_pretrain", *base, *extra, "--out", str(out)]
    return train.main(args + (["--resume"] if resume else []))


def _lr_in_config(run: Path) -> float:
    return yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]


def test_resume_with_a_changed_lr_is_refused_and_config_kept(assets: Assets, tmp_path: Path,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train(assets, run) == 0
    capsys.readouterr()
    state = json.loads((run / "ckpt-000002" / STATE_FILE).read_text())
    assert state["extra"]["config"]["optim"]["lr"] == 0.003  # the checkpoint records its recipe

    assert _train(assets, run, "optim.lr=0.1", steps=4, resume=True) == 2
    err = capsys.readouterr().err
    assert "mm-llama train: error: --resume: the recipe differs" in err and "optim.lr 0.003 → 0.1" in err
    assert "rerun without them" in err and "another --out" in err and "train.steps" not in err
    assert _lr_in_config(run) == 0.003 and [s for s, _ in list_checkpoints(run)] == [2]

    # a checkpoint from before the recipe was recorded in it: config.yaml is the reference
    del state["extra"]["config"]
    (run / "ckpt-000002" / STATE_FILE).write_text(json.dumps(state))
    assert _train(assets, run, "optim.weight_decay=0.5", steps=4, resume=True) == 2
    assert "optim.weight_decay 0.01 → 0.5" in capsys.readouterr().err


def test_resume_applies_and_logs_safe_changes(assets: Assets, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train(assets, run) == 0
    capsys.readouterr()
    assert _train(assets, run, "logging.every=2", steps=4, resume=True) == 0
    captured = capsys.readouterr()
    assert "--resume: applying changed settings: logging.every 1 → 2, train.steps 2 → 4 (the schedule now ends there" in captured.err
    assert "trained 4 steps" in captured.out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["steps"] == 4 and config["logging"]["every"] == 2


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(assets: Assets, tmp_path: Path,  # noqa: F811
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train(assets, run, steps=4) == 0
    (run / "ckpt-000004" / TRAINABLE_FILE).write_bytes(b"\x00garbage, not a safetensors file")
    capsys.readouterr()
    assert _train(assets, run, steps=6, resume=True) == 0
    captured = capsys.readouterr()
    warning = next(line for line in captured.err.splitlines() if line.startswith("warning:"))
    assert str(run / "ckpt-000004" / TRAINABLE_FILE) in warning and "falling back to the older ckpt-000002" in warning
    assert "resuming" in captured.err and "from ckpt-000002 (step 2" in captured.err
    assert "trained 6 steps" in captured.out

    for _, path in list_checkpoints(run):  # now every checkpoint is damaged
        (path / TRAINABLE_FILE).write_bytes(b"")
    assert _train(assets, run, steps=8, resume=True) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mm-llama train: error: no checkpoint of") and "\n" not in err
    assert all(str(path / TRAINABLE_FILE) in err for _, path in list_checkpoints(run))


def test_load_resumable_checkpoint_names_what_it_skips(tmp_path: Path) -> None:
    from mm_llama.train.checkpointing import NoIntactCheckpointError, load_resumable_checkpoint

    assert load_resumable_checkpoint(tmp_path) == (None, [])
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, trainable_state={"w": torch.ones(2)}, optimizer={"state": {}, "param_groups": []},
                        scheduler={"last_epoch": step})
    (tmp_path / "ckpt-000003" / STATE_FILE).write_text("{not json")
    (tmp_path / "ckpt-000002" / "scheduler.pt").unlink()
    ckpt, skipped = load_resumable_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 1
    assert [p.name for p, _ in skipped] == ["ckpt-000003", "ckpt-000002"]
    assert "state.json is corrupt" in skipped[0][1] and "lacks scheduler.pt" in skipped[1][1]
    (tmp_path / "ckpt-000001" / TRAINABLE_FILE).write_bytes(b"\xff" * 16)
    with pytest.raises(NoIntactCheckpointError, match=r"ckpt-000001/trainable\.safetensors: SafetensorError") as caught:
        load_resumable_checkpoint(tmp_path)
    assert isinstance(caught.value, ValueError)
