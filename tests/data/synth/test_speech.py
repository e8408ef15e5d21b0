"""`speech`: espeak-ng via ctypes, held-out voices for test, plausible non-silent 16 kHz FLAC."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import soundfile

from mm_llama.data.synth import espeak
from mm_llama.data.synth.speech import (
    ACCENTS, SAMPLE_RATE, SPLIT_VARIANTS, make_speech_sample, resample, speech_transcript, split_voices,
)


def test_voice_partition_uses_bundled_voices_and_holds_out_test() -> None:
    train, val, test = (set(split_voices(s)) for s in ("train", "val", "test"))
    assert not train & test and not train & val and not val & test
    assert not set(SPLIT_VARIANTS["train"]) & set(SPLIT_VARIANTS["test"])
    bundled_langs = set(espeak.languages("en"))
    assert set(ACCENTS) <= bundled_langs
    for voice in train | val | test:
        espeak.check_voice(voice)
    with pytest.raises(ValueError, match="no voice variant 'zz9'"):
        espeak.check_voice("en+zz9")
    with pytest.raises(ValueError, match="no language voice 'en-xx'"):
        espeak.check_voice("en-xx")


def test_generated_speech_is_plausible_and_splits_keep_their_voices() -> None:
    voices = {}
    for split, n in (("train", 5), ("test", 4)):
        voices[split] = set()
        for i in range(n):
            s = make_speech_sample(0, split, i, noise_prob=0.5)
            meta = s.json_dict()
            voices[split].add(meta["voice"])
            assert meta["voice"] in split_voices(split)
            assert meta["language"] == "English" and meta["sample_rate"] == SAMPLE_RATE
            audio, sr = soundfile.read(io.BytesIO(s.flac), dtype="int16")
            assert sr == SAMPLE_RATE and audio.ndim == 1
            duration = audio.size / sr
            assert duration == pytest.approx(meta["duration"], abs=1e-6)
            words = len(meta["text"].split())
            assert 0.3 < duration / words < 2.0, (meta["text"], duration)
            rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
            assert rms > 300, (meta["text"], rms)  # int16 units: well above silence
            if meta["source"] == "digits":
                assert meta["text"] == " ".join(
                    ("zero one two three four five six seven eight nine".split())[int(d)] for d in meta["digits"])
    assert not voices["train"] & voices["test"]


def test_synthesis_is_deterministic_whatever_came_before() -> None:
    a = espeak.synthesize("seven zero two", "en-us+f3", rate=90, seed=5)
    espeak.synthesize("what a lovely day it is", "en+m2", rate=150)
    b = espeak.synthesize("seven zero two", "en-us+f3", rate=90, seed=5)
    assert np.array_equal(a, b)
    assert a.size > 0.5 * espeak.sample_rate()
    c = espeak.synthesize("seven zero two", "en-us+m7", rate=90, seed=5)
    assert not np.array_equal(a, c)
    espeak.shutdown()  # a fresh helper process (as in another run) gives the same samples
    assert np.array_equal(a, espeak.synthesize("seven zero two", "en-us+f3", rate=90, seed=5))


def test_synthesis_is_thread_safe() -> None:
    texts = [f"{w} circle" for w in ("red", "green", "blue", "pink")]
    serial = [espeak.synthesize(t, "en+m3", seed=1) for t in texts]
    results: list[np.ndarray | None] = [None] * len(texts)

    def work(i: int) -> None:
        results[i] = espeak.synthesize(texts[i], "en+m3", seed=1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and np.array_equal(r, s) for r, s in zip(results, serial))


def test_synthesis_errors() -> None:
    with pytest.raises(ValueError, match="empty text"):
        espeak.synthesize("  ", "en")
    with pytest.raises(ValueError, match="rate must be"):
        espeak.synthesize("hello", "en", rate=20)


def test_resample_keeps_in_band_tones_and_removes_aliases() -> None:
    sr = 22050
    t = np.arange(sr) / sr
    y = resample(np.sin(2 * np.pi * 1000 * t), sr, SAMPLE_RATE)
    assert y.size == SAMPLE_RATE
    t2 = np.arange(y.size) / SAMPLE_RATE
    assert np.abs(y[64:-64] - np.sin(2 * np.pi * 1000 * t2[64:-64])).max() < 1e-3
    alias = resample(np.sin(2 * np.pi * 9500 * t), sr, SAMPLE_RATE)  # above the new Nyquist (8 kHz)
    assert np.sqrt(np.mean(alias[64:-64] ** 2)) < 1e-3
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10)), sr, SAMPLE_RATE)


def test_a_dead_helper_is_replaced() -> None:
    before = espeak.synthesize("one two", "en+m1", seed=3)
    with espeak._LOCK:
        proc = espeak._helper().proc
    proc.kill()
    proc.wait()
    assert np.array_equal(espeak.synthesize("one two", "en+m1", seed=3), before)


def test_the_transcript_alone_is_what_the_sample_speaks() -> None:
    """The demo's LM reads the training transcripts without synthesising them (`speech_transcript`)."""
    for split, index in (("train", 0), ("train", 7), ("test", 3)):
        assert speech_transcript(0, split, index) == make_speech_sample(0, split, index).utterance.text
    assert speech_transcript(0, "train", 0) != speech_transcript(1, "train", 0)
