"""Issue 11: `optim.lr=.inf` is refused up front; weights that are not finite are never checkpointed or
exported (the tensors are named); a run that ends on non-finite losses does not report success."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_llama.commands import train
from mm_llama.train.checkpointing import list_checkpoints
from mm_llama.train.distributed import DistributedContext
from mm_llama.train.recipe import load_recipe
from mm_llama.train.trainer import Trainer
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401


def _without_lr(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("optim.lr=")]  # a key given twice is refused


def test_infinite_lr_is_refused_before_anything_runs(assets: Assets, tmp_path: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train.main(["tiny_vision_pretrain", *_without_lr(mm_overrides(assets)), "optim.lr=.inf", "--out", str(out)]) == 2
    assert "optim.lr must be a finite number, got inf" in capsys.readouterr().err
    assert not out.exists()


def _run_poisoned(cfg, run_dir: Path, *, at_step: int, trainable: bool) -> str:
    """Train `cfg`, setting one element of a (trainable or frozen) adapter weight to NaN after `at_step`;
    returns the poisoned tensor's name (the run is expected to raise)."""
    poisoned: list[str] = []

    def on_step_end(step: int, info: dict) -> None:
        if step != at_step:
            return
        name, param = next((n, p) for n, p in trainer.model.named_parameters()
                           if p.requires_grad == trainable and n.startswith("image.encoder."))
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        poisoned.append(name)

    ctx = DistributedContext.from_env("cpu")
    trainer = Trainer(cfg, run_dir, ctx, on_step_end=on_step_end)
    try:
        trainer.run()
    finally:
        ctx.close()
    raise AssertionError(f"the run succeeded with {poisoned} poisoned")


def test_nan_weights_are_not_checkpointed_and_older_checkpoints_kept(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from mm_llama.train.nonfinite import NonFiniteWeightsError

    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=3, checkpoint__every=1, checkpoint__keep_last=1))
    with pytest.raises(NonFiniteWeightsError) as caught:  # poisoned after step 1's checkpoint: step 2's is refused
        _run_poisoned(cfg, tmp_path, at_step=1, trainable=True)
    message = str(caught.value)
    assert "tensors of the trained weights at step 2 hold NaN or infinity: image.encoder." in message
    assert "the newest checkpoint, ckpt-000001, keeps the last finite weights" in message and "optim.lr" in message
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # keep_last=1 did not delete the good one
    assert not (tmp_path / "adapter.safetensors").exists()


def test_nan_in_exported_weights_is_an_error_naming_them(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from mm_llama.train.nonfinite import NonFiniteWeightsError

    # a frozen encoder is exported with the adapter but not checkpointed: only the export check sees it
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2, model__train=["image.fusion"]))
    with pytest.raises(NonFiniteWeightsError, match=r"1 of \d+ tensors of the weights to export to .*adapter\.safetensors"
                                                    r" hold NaN or infinity: image\.encoder\.") as caught:
        _run_poisoned(cfg, tmp_path, at_step=2, trainable=False)
    assert not (tmp_path / "adapter.safetensors").exists()
    assert caught.value.args[0].count("image.encoder.") == 1


def test_a_run_ending_on_non_finite_losses_does_not_report_success(assets: Assets, tmp_path: Path,  # noqa: F811
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # a finite but absurd learning rate: the weights stay finite, every loss after the first step is NaN
    code = train.main(["tiny_vision_pretrain", *mm_overrides(assets, steps=4, optim__lr=1e30), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "trained" not in captured.out
    assert "mm-llama train: stopped: the run ended at step 4 after 3 step(s) in a row with a non-finite loss" in captured.err
    assert "Nothing was exported" in captured.err and not (out / "adapter.safetensors").exists()
