"""`mm-llama transcribe` / `translate` on a tiny (untrained) speech model: any rate, stereo, long files cut
into windows the model holds; unreadable files get one line each and the others still run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from mm_llama.checkpoints.loading import load_llama
from mm_llama.checkpoints.multimodal_loading import save_adapter
from mm_llama.cli import main
from mm_llama.data.synth.text import read_corpus
from mm_llama.modalities import SpeechModality
from mm_llama.modalities.speech import speech_configs
from mm_llama.multimodal import MultimodalLlama
from tests.train.test_trainer_setup import write_random_lm


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mm_llama.data.synth import write_synth

    root = tmp_path_factory.mktemp("speech-model")
    write_synth("text", root / "data", n=40, seed=0, split="train")
    base = write_random_lm(root, list(read_corpus(root / "data" / "text" / "train-corpus.txt")), vocab_size=300)
    lm = load_llama(base)
    torch.manual_seed(0)
    model = MultimodalLlama(lm, [SpeechModality(lm.cfg, *speech_configs({}))])
    return save_adapter(model, root / "run", base_lm=base)


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    return np.stack([wave, wave * 0.5], axis=1) if channels == 2 else wave


def test_transcribe_reads_any_audio_and_names_what_it_cannot(speech_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    files = {"a.wav": (_tone(2.0, 16_000), 16_000), "b.flac": (_tone(1.5, 16_000), 16_000),
             "c.wav": (_tone(1.0, 44_100, channels=2), 44_100), "long.wav": (_tone(180.0, 16_000), 16_000)}
    for name, (wave, rate) in files.items():
        soundfile.write(tmp_path / name, wave, rate)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("this is text, not audio\n")
    names = ["a.wav", "empty.wav", "b.flac", "c.wav", "notes.wav", "missing.wav", "long.wav"]
    rc = main(["transcribe", "--model", str(speech_run), *[str(tmp_path / n) for n in names],
               "--max-new-tokens", "2", "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    records = {Path(r["file"]).name: r for r in map(json.loads, out.splitlines())}
    assert rc == 1 and list(records) == names
    assert all(isinstance(records[n]["text"], str) for n in ("a.wav", "b.flac", "c.wav", "long.wav"))
    assert records["a.wav"]["windows"] == records["c.wav"]["windows"] == 1
    assert records["long.wav"]["windows"] > 1  # 3 minutes do not fit the tiny LM's 256 positions at once
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert [Path(line.split("skipped ", 1)[1].split(": ", 1)[0]).name for line in skipped] == \
        ["empty.wav", "notes.wav", "missing.wav"]
    assert "3 of 7 file(s) could not be read" in err


def test_translate_prompts_for_the_target_language(speech_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import mm_llama.speech_chat as speech_chat
    from mm_llama.tokenizer import Tokenizer

    prompts: list[list[int]] = []
    real = speech_chat.generate

    def spy(model, batch_prompts, gen, **kwargs):
        prompts.extend(batch_prompts)
        return real(model, batch_prompts, gen, **kwargs)

    monkeypatch.setattr(speech_chat, "generate", spy)
    soundfile.write(tmp_path / "a.wav", _tone(1.0, 16_000), 16_000)
    assert main(["translate", "--model", str(speech_run), "--to", "fr", str(tmp_path / "a.wav"),
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    tok = Tokenizer.from_dir(speech_run.parent / "base-lm")
    text = tok.decode([t for t in prompts[0] if t < tok.vocab_size])
    assert "Translate the following sentence into French:" in text
    assert sum(t == tok.vocab_size + 4 for t in prompts[0]) == 13  # 1 s of audio: 13 <speech> placeholders


def test_caption_on_a_speech_model_says_what_the_model_reads(speech_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["caption", "--model", str(speech_run), str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    assert "this model reads ['speech'], not images" in capsys.readouterr().err

