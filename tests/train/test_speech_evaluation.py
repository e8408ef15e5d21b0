"""Speech scores: WER after Whisper's English normalisation and sacreBLEU on hand-checked pairs, and
`mm-llama eval --task asr|ast` (with its silence control) on a tiny untrained speech model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_llama.cli import main
from mm_llama.data.synth import write_synth
from mm_llama.train.speech_evaluation import bleu, normalize_english, word_error_rate
from tests.mm_llama.test_speech_commands import speech_run  # noqa: F401


def test_wer_counts_word_edits_after_normalisation() -> None:
    assert normalize_english("Hello, World!  It's 3 PM.") == normalize_english("hello world it is 3 pm")
    assert word_error_rate(["Hello, world!"], ["hello world"]) == 0.0
    # "the cat sat" against "the cat sat down": one deletion over 4 reference words; then 1 substitution
    # of 2 words in the second pair: corpus WER = (1 + 1) / (4 + 2)
    assert word_error_rate(["the cat sat", "red square"], ["the cat sat down", "red circle"]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="one prediction per reference"):
        word_error_rate(["a"], ["a", "b"])


def test_bleu_is_sacrebleu_corpus_bleu() -> None:
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["completely different words here"], ["the cat sat on the mat"]) < 10.0


def test_eval_asr_and_its_silence_control(speech_run: Path, tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    write_synth("speech", tmp_path / "data", n=6, seed=0, split="test")
    shards = str(tmp_path / "data" / "speech" / "test-*.tar")
    for blank, name in ((False, "eval-asr.json"), (True, "eval-asr-blank.json")):
        rc = main(["eval", "--model", str(speech_run), "--task", "asr", "--shards", shards, "--max-new-tokens", "3",
                   "--no-progress", "--device", "cpu"] + (["--blank-audio"] if blank else []))
        assert rc == 0
        result = json.loads((speech_run / name).read_text())
        assert result["counts"]["samples"] == 6 and result["settings"]["blank_audio"] is blank
        assert result["metrics"]["wer"] >= 0.0 and len(result["records"]) == 6
        assert all(set(r) >= {"key", "reference", "prediction"} and r["reference"] for r in result["records"])
    assert "WER (Whisper-normalised)" in capsys.readouterr().out
    assert main(["eval", "--model", str(speech_run), "--task", "asr", "--shards", shards, "--blank-images"]) == 2
    assert "--blank-images is the control of caption / vqa, --blank-audio that of asr / ast" in capsys.readouterr().err
