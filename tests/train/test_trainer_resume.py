"""Resume after SIGKILL: `mm-llama train` killed mid-training and continued with --resume ends with the
same trained parameters, bit for bit on CPU, as an uninterrupted run of the same length."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mm_llama.train.checkpointing import TRAINABLE_FILE, list_checkpoints
from mm_llama.train.metrics import read_metrics
from tests.train.test_trainer_setup import Assets, assets, mm_overrides, run_command, subprocess_env, train_command  # noqa: F401

STEPS = 24  # 8 batches of 4 per epoch: the run crosses two epoch boundaries
EVERY = 4


def _args(a: Assets, out: Path) -> list[str]:
    return [*train_command(), "tiny_vision_pretrain", *mm_overrides(a, steps=STEPS, checkpoint__every=EVERY,
                                                                  checkpoint__keep_last=2), "--out", str(out)]


def test_sigkill_then_resume_is_bit_identical(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    straight = run_command(_args(assets, tmp_path / "straight"), tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_args(assets, killed_dir), cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while not list_checkpoints(killed_dir):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    steps_done = [s for s, _ in list_checkpoints(killed_dir)]
    assert steps_done and steps_done[-1] < STEPS and not (killed_dir / "adapter.safetensors").exists()

    resumed = run_command(_args(assets, killed_dir) + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr

    final_a = load_file(str(tmp_path / "straight" / f"ckpt-{STEPS:06d}" / TRAINABLE_FILE))
    final_b = load_file(str(killed_dir / f"ckpt-{STEPS:06d}" / TRAINABLE_FILE))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    adapter_a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    adapter_b = load_file(str(killed_dir / "adapter.safetensors"))
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    # the metrics log continues without gaps or duplicates, with the same losses
    losses_a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    records_b = read_metrics(killed_dir)
    assert [r["step"] for r in records_b] == list(range(1, STEPS + 1))
    assert all(r["loss"] == losses_a[r["step"]] for r in records_b)
