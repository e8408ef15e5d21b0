"""metrics.jsonl + TensorBoard events; resume truncation; the progress bar."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama.train.metrics import METRICS_FILE, MetricsLogger, ProgressBar, Throughput, read_metrics


def test_metrics_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"loss": torch.tensor(2.0), "lr": {"encoder": 1e-4, "fusion": 1e-3}}, grad_norm=np.float32(0.5))
        assert len(read_metrics(tmp_path)) == 1  # flushed on every write
        log.log(2, loss=math.nan, skipped_samples=3, nonfinite_steps=1)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 2.0 and records[0]["lr"] == {"encoder": 1e-4, "fusion": 1e-3}
    assert records[0]["grad_norm"] == 0.5 and math.isnan(records[1]["loss"])
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resume_drops_records_past_the_checkpoint_and_torn_lines(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, loss=float(step))
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        log.log(4, loss=40.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    disabled = MetricsLogger(tmp_path / "rank1", enabled=False)
    disabled.log(1, loss=1.0)
    assert not (tmp_path / "rank1").exists()


def test_progress_bar_and_throughput(capsys) -> None:
    meter = Throughput()
    meter.add(samples=4, tokens=100)
    rates = meter.rates()
    assert rates["samples_per_s"] > 0 and rates["tokens_per_s"] == pytest.approx(rates["samples_per_s"] * 25)
    with ProgressBar(total=3) as bar:
        for _ in range(3):
            bar.update(loss=1.25, tokens_per_s=1234.0, samples_per_s=8.0)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=1.2500" in err and "tok/s=1,234" in err
