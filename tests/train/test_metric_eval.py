"""`train.eval_metric_samples`: periodic evaluation in training scores the task metric (here VQA accuracy) on
the first N eval samples with the evaluation `mm-llama eval` runs, without changing training."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mm_llama.commands import evaluate as eval_command
from mm_llama.train.metrics import read_metrics
from mm_llama.train.recipe import RecipeError, load_recipe
from mm_llama.train.task_evaluation import metric_result_path, preserved_training_state
from mm_llama.train.trainer import run_training
from tests.train.test_trainer_setup import Assets, assets, mm_overrides  # noqa: F401

SAMPLES = 3


def _qa(assets: Assets, split: str) -> str:  # noqa: F811
    return str(assets.data / "image-qa" / f"{split}-*.tar")


def _overrides(assets: Assets, **more: object) -> list[str]:  # noqa: F811
    """A 4-step vqa adapter run evaluated every 2 steps. LoRA dropout on the frozen LM draws random numbers
    and acts only in train mode, so an evaluation that leaked RNG draws or eval mode would change the losses."""
    return mm_overrides(
        assets, steps=4, data__task="vqa", data__shards=[_qa(assets, "train")], data__eval_shards=[_qa(assets, "val")],
        train__eval_every=2, train__eval_batches=1, model__lora={"rank": 2, "dropout": 0.5},
        model__train=["image.encoder", "image.fusion", "lora"], **more)


@pytest.fixture(scope="module")
def runs(assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """The same run with the task metric off and on."""
    root = tmp_path_factory.mktemp("metric-eval")
    off = run_training(load_recipe("tiny_vision_pretrain", _overrides(assets)), root / "off")
    on = run_training(load_recipe("tiny_vision_pretrain", _overrides(assets, train__eval_metric_samples=SAMPLES)),
                      root / "on")
    return off, on


def test_the_metric_leaves_training_bit_identical(runs) -> None:
    off, on = runs
    assert len(on.history) == 4 and on.history == off.history
    on_state, off_state = on.model.state_dict(), off.model.state_dict()
    assert all(torch.equal(on_state[k], off_state[k]) for k in off_state)
    assert on.model.training and all(m.training for m in on.model.modules())


def test_metrics_jsonl_holds_the_metric_at_each_evaluation(runs) -> None:
    off, on = runs
    evals = {r["step"]: r["eval"] for r in read_metrics(on.run_dir) if "eval" in r}
    assert sorted(evals) == [2, 4]
    for e in evals.values():
        assert {"loss", "vqa_accuracy", "exact_match", "majority_baseline", "metric_samples"} <= set(e)
        assert e["metric_samples"] == SAMPLES and 0.0 <= e["vqa_accuracy"] <= 1.0
    off_evals = {r["step"]: r["eval"] for r in read_metrics(off.run_dir) if "eval" in r}
    assert all("vqa_accuracy" not in e for e in off_evals.values())
    assert [off_evals[s]["loss"] for s in (2, 4)] == [evals[s]["loss"] for s in (2, 4)]
    assert on.last_eval == evals[4]
    for step in (2, 4):
        stored = json.loads(metric_result_path(on.run_dir, "vqa", step).read_text())
        assert stored["settings"]["step"] == step and stored["counts"]["samples"] == SAMPLES


def test_the_final_metric_is_what_mm_llama_eval_gives_on_the_export(runs, assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    _, on = runs
    parser = argparse.ArgumentParser()
    eval_command.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "eval.json"
    args = parser.parse_args(["eval", "--model", str(on.run_dir), "--shards", _qa(assets, "val"), "--task", "vqa",
                              "--max-samples", str(SAMPLES), "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert args.run(args) == 0
    command = json.loads(out.read_text())
    during = json.loads(metric_result_path(on.run_dir, "vqa", 4).read_text())
    logged = [r["eval"] for r in read_metrics(on.run_dir) if r["step"] == 4 and "eval" in r][0]
    assert [r["prediction"] for r in during["records"]] == [r["prediction"] for r in command["records"]]
    assert [r["key"] for r in during["records"]] == [r["key"] for r in command["records"]]
    assert {k: logged[k] for k in command["metrics"]} == command["metrics"]


def test_the_training_state_is_put_back_after_an_evaluation() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Linear(2, 2)))
    model.train()
    model[2].eval()  # a part kept in eval mode while the rest trains
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with preserved_training_state(model):
        model.eval()
        torch.rand(5), random.random(), np.random.rand(4)
    assert [m.training for m in model.modules()] == [True, True, True, False, False]
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.mark.parametrize("changes, message", [
    ({"train.eval_every": 0}, r"train\.eval_every is 0 \(never\)"),
    ({"data.eval_shards": []}, r"data\.eval_shards, which is empty"),
    ({"data.task": "caption_vqa"}, r"data\.task is 'caption_vqa'.*mm-llama eval"),
    ({"train.eval_metric_samples": -1}, r"train\.eval_metric_samples must be >= 0, got -1"),
])
def test_recipe_errors_name_what_is_missing(assets: Assets, changes: dict, message: str) -> None:  # noqa: F811
    values = {"data.task": "vqa", "train.eval_every": 2, "data.eval_shards": ["x.tar"], "train.eval_metric_samples": 4,
              **changes}
    overrides = mm_overrides(assets, **{k.replace(".", "__"): v for k, v in values.items()})
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny_vision_pretrain", overrides)


def test_the_metric_evaluation_decodes_eagerly(assets: Assets, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """During training the metric is generated on the eager decode path (`compile=False`): the model may be
    DDP / FSDP-wrapped, and a compile per evaluation size would cost more than the evaluation."""
    from types import SimpleNamespace

    from mm_llama.train import task_evaluation

    seen: dict = {}

    def recording_evaluate_task(model, tokenizer, shards, task, **settings):
        seen.update(settings, task=task, shards=shards)
        return SimpleNamespace(metrics={"vqa_accuracy": 0.5}, counts={"samples": SAMPLES})

    monkeypatch.setattr(task_evaluation, "evaluate_task", recording_evaluate_task)
    cfg = load_recipe("tiny_vision_pretrain", _overrides(assets, train__eval_metric_samples=SAMPLES))
    metric = task_evaluation.MetricEvaluation(cfg, tokenizer=None, run_dir=assets.data, write=False)
    assert metric(nn.Linear(2, 2), step=2) == {"vqa_accuracy": 0.5, "metric_samples": float(SAMPLES)}
    assert seen["compile"] is False and seen["max_samples"] == SAMPLES and seen["task"] == "vqa"
