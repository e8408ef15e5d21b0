"""BEST-RQ through the trainer (CPU, tiny): `tiny_speech_bestrq` reads audio without text or tokenizer,
learns to predict the masked steps' codes, exports the Conformer, and the speech stage starts from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.data.synth import write_synth
from mm_llama.encoders.conformer import CONFORMER_PRESETS, ConformerEncoder
from mm_llama.train.metrics import read_metrics
from mm_llama.train.recipe import load_recipe
from mm_llama.train.stages import build
from mm_llama.train.trainer import run_training
from tests.train.test_trainer_setup import Assets, assets  # noqa: F401


def _common(steps: int) -> dict[str, object]:
    return {"train.steps": steps, "train.device": "cpu", "schedule.warmup_steps": 3, "checkpoint.every": 100,
            "logging.every": 1, "logging.progress": False, "logging.tensorboard": False, "data.batch_size": 8}


def _args(values: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("bestrq-data")
    write_synth("speech", data, n=24, seed=0, split="train")
    return data


@pytest.fixture(scope="module")
def bestrq_run(speech_data: Path, tmp_path_factory: pytest.TempPathFactory):
    values = {**_common(30), "data.shards": [str(speech_data / "speech" / "train-*.tar")],
              "model.speech": {"encoder": "tiny", "best_rq": {"codebook_size": 64}}, "optim.lr": 3e-3}
    cfg = load_recipe("tiny_speech_bestrq", _args(values))
    return run_training(cfg, tmp_path_factory.mktemp("bestrq-run")), cfg


def test_best_rq_learns_the_masked_codes(bestrq_run) -> None:
    result, cfg = bestrq_run
    first, last = sum(result.history[:5]) / 5, sum(result.history[-5:]) / 5
    assert first > 3.5 and last < first - 0.5, result.history  # ln(64) = 4.16 at the start
    records = read_metrics(result.run_dir)
    assert {"perplexity", "accuracy", "masked_fraction"} <= set(records[-1])
    assert all(0.3 < r["masked_fraction"] < 0.8 for r in records)
    assert list(result.model.parameter_groups()) == ["speech.encoder", "best_rq.heads"]
    assert torch.equal(result.model.quantizer.codes, build(cfg).model.quantizer.codes)  # seeded, never trained


def test_the_exported_encoder_starts_the_speech_stage(bestrq_run, speech_data: Path, assets: Assets,  # noqa: F811
                                                       tmp_path: Path) -> None:
    result, _ = bestrq_run
    exported = load_file(str(result.run_dir / "speech_encoder.safetensors"))
    encoder = ConformerEncoder(CONFORMER_PRESETS["tiny"])
    encoder.load_state_dict(exported)  # strict: the whole Conformer, feature statistics included
    assert torch.equal(encoder.feature_mean, result.model.encoder.feature_mean)
    values = {**_common(1), "schedule.warmup_steps": 0, "data.shards": [str(speech_data / "speech" / "train-*.tar")],
              "model.base_lm": str(assets.base_lm), "optim.lr": 1e-12,
              "model.speech": {"encoder": "tiny", "adapter": "tiny", "encoder_checkpoint": str(result.run_dir)}}
    sft = run_training(load_recipe("tiny_speech_sft", _args(values)), tmp_path)
    started = sft.model.speech.encoder.state_dict()
    differ = [k for k, v in exported.items() if not torch.allclose(started[k], v, atol=1e-6)]
    assert not differ, differ

class _Killed(RuntimeError):
    pass


def test_a_killed_run_resumes_on_the_same_targets_masks_and_losses(speech_data: Path, tmp_path: Path) -> None:
    values = {**_common(6), "checkpoint.every": 3, "data.shards": [str(speech_data / "speech" / "train-*.tar")],
              "model.speech": {"encoder": "tiny", "best_rq": {"codebook_size": 64}}, "optim.lr": 3e-3}
    cfg = load_recipe("tiny_speech_bestrq", _args(values))
    whole = run_training(cfg, tmp_path / "whole")

    def kill_after_step_4(step: int, info: dict) -> None:  # past the step-3 checkpoint: step 4 is redone
        if step == 4:
            raise _Killed

    with pytest.raises(_Killed):
        run_training(cfg, tmp_path / "cut", on_step_end=kill_after_step_4)
    resumed = run_training(cfg, tmp_path / "cut", resume=True)
    assert resumed.steps == 6 and len(resumed.history) == 3
    assert resumed.history == whole.history[3:]  # same codes, same span masks, same batches: bit-identical
    features = torch.randn(2, 120, 80, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([120, 77])
    targets = whole.model.targets(features, lengths)
    assert torch.equal(resumed.model.targets(features, lengths), targets)
    assert torch.equal(build(cfg).model.targets(features, lengths), targets)
