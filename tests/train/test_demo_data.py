"""The demo's own data: silent training clips (`write_silence`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile

from mm_llama.data.records import read_transcript
from mm_llama.train.demo_data import SILENCE_LAYOUT, SILENCE_TRANSCRIPT, train_shards, write_silence
from mm_llama.train.speech_evaluation import normalize_english


def test_silent_clips_hold_no_speech_and_a_transcript_without_words(tmp_path: Path) -> None:
    assert write_silence(tmp_path, 6, seed=0, samples_per_shard=4) == "6 silent clips"
    shards = train_shards(tmp_path, SILENCE_LAYOUT)
    assert [Path(s).name for s in shards] == ["train-000000.tar", "train-000001.tar"]
    clips: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                clips.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert len(clips) == 6
    peaks = []
    for files in clips.values():
        meta = json.loads(files["json"])
        audio, rate = soundfile.read(io.BytesIO(files["flac"]), dtype="float32")
        assert rate == meta["sample_rate"] == 16_000 and 1.0 <= len(audio) / rate <= 6.0
        assert abs(meta["duration"] - len(audio) / rate) < 1e-6
        peaks.append(float(np.abs(audio).max()))
        record = read_transcript(None, meta)  # trainable: the reader the ASR loader uses accepts it
        assert record.references == (SILENCE_TRANSCRIPT,) and normalize_english(record.references[0]).split() == []
    assert max(peaks) <= 0.01 and min(peaks) == 0.0 and sum(p > 0 for p in peaks) == 3  # digital silence and faint noise
    # the same seed writes the same bytes
    write_silence(tmp_path / "again", 6, seed=0, samples_per_shard=4)
    again = train_shards(tmp_path / "again", SILENCE_LAYOUT)
    assert [Path(s).read_bytes() for s in again] == [Path(s).read_bytes() for s in shards]
