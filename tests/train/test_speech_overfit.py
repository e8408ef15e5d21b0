"""The speech path learns (issue 14): a tiny Conformer + speech adapter, trained with `tiny_speech_sft` on
a dozen espeak utterances onto a frozen tiny LM that has read their transcripts, transcribes them with WER 0;
with the audio replaced by silence the same model is far off (it can only guess a transcript); each
utterance decodes to the same transcript alone as padded in a batch of longer ones."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest

from mm_llama.data.synth import write_synth
from mm_llama.image_chat import load_image_model
from mm_llama.tokenizer_training import train_llama3_tokenizer
from mm_llama.train.recipe import load_recipe
from mm_llama.train.speech_evaluation import evaluate_speech
from mm_llama.train.trainer import run_training

SYSTEM = "Repeat after me in English:"


def _transcripts(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [json.loads(tar.extractfile(m).read())["text"] for m in tar if m.name.endswith(".json")]  # type: ignore[union-attr]


def _chat_shard(path: Path, texts: list[str]) -> None:
    """The ASR exchange as text (system prompt, empty user turn, the transcript), the way the LM will see it."""
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            doc = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
                   f"<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                   f"<|start_header_id|>assistant<|end_header_id|>\n\n{text}<|eot_id|>").encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(doc)
            tar.addfile(info, io.BytesIO(doc))


def _args(values: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


@pytest.mark.slow
def test_tiny_speech_sft_transcribes_its_training_utterances(tmp_path: Path) -> None:
    write_synth("speech", tmp_path / "data", n=12, seed=0, split="train")
    shards = str(tmp_path / "data" / "speech" / "train-*.tar")
    texts = _transcripts(next((tmp_path / "data" / "speech").glob("*.tar")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus gives fewer merges than asked
        train_llama3_tokenizer(texts * 20, 400, tmp_path / "tok")
    _chat_shard(tmp_path / "lm-text.tar", texts * 4)
    common = {"logging.progress": False, "logging.tensorboard": False, "train.device": "cpu", "data.batch_size": 8}
    run_training(load_recipe("tiny_lm_pretrain", _args({
        **common, "data.shards": [str(tmp_path / "lm-text.tar")], "data.tokenizer": str(tmp_path / "tok"),
        "data.options.allow_special": True, "model.text.max_seq_len": 512, "train.steps": 100})), tmp_path / "lm")
    run_training(load_recipe("tiny_speech_sft", _args({
        **common, "model.base_lm": str(tmp_path / "lm"), "data.shards": [shards], "data.batch_size": 4,
        "train.steps": 400, "optim.lr": 2e-3})), tmp_path / "sft")
    model, tok = load_image_model(tmp_path / "sft", dtype="float32", device="cpu")
    heard = evaluate_speech(model, tok, shards, "asr", max_new_tokens=80, progress=False)
    silence = evaluate_speech(model, tok, shards, "asr", max_new_tokens=80, progress=False, blank_audio=True)
    assert heard.counts["samples"] == 12
    print(f"WER on the training utterances {heard.metrics['wer']:.3f}, with silence {silence.metrics['wer']:.3f}")
    # Measured (2026-12-05, CPU): WER 0 for model seeds 0 and 1 and another data seed, silence 0.97-1.47;
    # at lr 1e-3, or with 300 steps, one of three seeds keeps one utterance wrong.
    assert heard.metrics["wer"] == 0.0, [r for r in heard.records if r["prediction"] != r["reference"]]
    assert silence.metrics["wer"] > 0.5
    # batch invariance of the greedy transcript: each utterance alone gives what it gave padded in a batch of 8
    alone = evaluate_speech(model, tok, shards, "asr", max_new_tokens=80, progress=False, batch_size=1)
    assert [r["prediction"] for r in alone.records] == [r["prediction"] for r in heard.records]
