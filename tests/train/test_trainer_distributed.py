"""`torchrun --nproc_per_node 2` (gloo, CPU) running `mm-llama train` gives the loss curve of one process
with the same global batch: each rank reads its own shards, the loss is normalised by the token count
over all ranks, and DDP averages the gradients — also with the frozen LM sharded by FSDP2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mm_llama.train.metrics import read_metrics
from tests.train.test_trainer_setup import Assets, assets, mm_overrides, run_command, train_command  # noqa: F401

STEPS = 2
PER_RANK = 2  # = samples per shard: rank r reads shards r, r+2, …; one process reads them in order


def _overrides(a: Assets, batch: int) -> list[str]:
    # A large Adam eps keeps float-noise gradients (summation order differs between 1 and 2 ranks) of
    # parameters whose true gradient is ~0 from becoming lr-sized steps, so parameters compare too.
    return mm_overrides(a, steps=STEPS, data__shards=[str(a.dist_data / "image-caption" / "train-*.tar")],
                        data__batch_size=batch, data__shuffle=False, checkpoint__every=STEPS, optim__eps=1e-3)


def test_two_ranks_match_one_process_with_the_same_global_batch(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    command = train_command()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    module = command[2:]  # ["mm_llama.cli", "train"] or ["mm_llama.commands.train"]
    two = run_command([*launcher, "-m", *module, "tiny_vision_pretrain", *_overrides(assets, PER_RANK),
                       "--out", str(tmp_path / "two")], tmp_path, timeout=240)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_command([*command, "tiny_vision_pretrain", *_overrides(assets, 2 * PER_RANK), "--out", str(tmp_path / "one")],
                      tmp_path)
    assert one.returncode == 0, one.stderr[-4000:]

    state = json.loads((tmp_path / "two" / f"ckpt-{STEPS:06d}" / "state.json").read_text())
    assert state["extra"]["world_size"] == 2
    curve_two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    curve_one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    assert len(curve_one) == STEPS and curve_two == pytest.approx(curve_one, rel=1e-5)
    samples_two = [r["samples_per_s"] > 0 for r in read_metrics(tmp_path / "two")]
    assert all(samples_two)
    a = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    # the same with the frozen LM sharded by FSDP2 (gloo on CPU)
    fsdp = run_command([*launcher, "-m", *module, "tiny_vision_pretrain", *_overrides(assets, PER_RANK),
                        "distributed.fsdp_frozen_lm=true", "--out", str(tmp_path / "fsdp")], tmp_path, timeout=240)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    assert [r["loss"] for r in read_metrics(tmp_path / "fsdp")] == pytest.approx(curve_one, rel=1e-5)
    c = load_file(str(tmp_path / "fsdp" / "adapter.safetensors"))
    assert c.keys() == b.keys() and max(float((c[k] - b[k]).abs().max()) for k in c) < 1e-5
