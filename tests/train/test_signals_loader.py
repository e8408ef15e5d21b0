"""Issue 11: a SIGTERM that arrives while the trainer waits in `next(loader)` is honoured once the loader
returns (checkpoint, then stop); a loader that raises instead ends the run with its error, at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mm_llama.data.loader_stats import TooManySkippedError
from mm_llama.train import trainer as trainer_module
from mm_llama.train.checkpointing import list_checkpoints
from mm_llama.train.recipe import load_recipe
from mm_llama.train.trainer import run_training
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401


class _SlowSource:
    """Wraps the real source: the 3rd batch takes long to arrive and a SIGTERM comes in meanwhile; then it
    is returned, or (`fail`) the loader raises as one that can read nothing does."""

    def __init__(self, inner: Any, fail: bool) -> None:
        self.inner, self.fail, self.drawn = inner, fail, 0

    @property
    def skipped_samples(self) -> int:
        return self.inner.skipped_samples

    def iter_epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        for batch in self.inner.iter_epoch(epoch, skip):
            self.drawn += 1
            if self.drawn == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.3)  # still "inside" next(loader) when the signal is handled
                if self.fail:
                    raise TooManySkippedError("the data loader skipped 40 of 40 samples, and not one sample could be used")
            yield batch


def _patched(monkeypatch: pytest.MonkeyPatch, fail: bool) -> list[_SlowSource]:
    made: list[_SlowSource] = []
    real = trainer_module.make_source

    def make_source(*args: Any, **kwargs: Any) -> _SlowSource:
        made.append(_SlowSource(real(*args, **kwargs), fail))
        return made[-1]

    monkeypatch.setattr(trainer_module, "make_source", make_source)
    return made


def test_sigterm_during_a_slow_next_stops_after_that_step(assets: Assets, tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _patched(monkeypatch, fail=False)
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=6, checkpoint__every=100))
    before = signal.getsignal(signal.SIGTERM)
    result = run_training(cfg, tmp_path)
    assert result.stopped and result.steps == 3 and result.export is None
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_loader_that_raises_after_sigterm_ends_the_run_with_its_error(assets: Assets, tmp_path: Path,  # noqa: F811
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mm_llama.commands import train

    _patched(monkeypatch, fail=True)
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    code = train.main(["tiny_vision_pretrain", *mm_overrides(assets, steps=6, checkpoint__every=2), "--out", str(tmp_path)])
    assert time.monotonic() - t0 < 60
    assert code == 1
    assert "mm-llama train: stopped: the data loader skipped 40 of 40 samples" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]  # the last periodic checkpoint; nothing half-made
    assert not (tmp_path / "adapter.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) == before
