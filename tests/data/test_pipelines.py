"""Round trips shards → loader → batch for every task family, splits, reproducibility, skips and fuzz.

Media are tiny but real: PNG/JPEG via Pillow, FLAC/WAV via soundfile, mp4 via PyAV. Tests load in
the calling process (num_workers=0) except one two-worker test.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchaudio.compliance.kaldi import fbank
from webdataset import TarWriter

from mm_llama.data import loader_stats
from mm_llama.data.loader_stats import TooManySkippedError
from mm_llama.data.pipelines import (
    Loader,
    LoaderConfig,
    audio_text_loader,
    image_text_loader,
    loader_for_task,
    video_text_loader,
)
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.data.shard_writer import ShardWriter
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer

TILE = 28
CORPUS = [
    "a red circle on the left", "a blue square on the right", "what colour is the circle?", "red", "blue",
    "how many shapes are there?", "two", "the square moves up", "hello world", "bonjour le monde",
    "Describe this image in one sentence.", "Repeat after me in English:", "Translate the following sentence into",
]


# --------------------------------------------------------------------------------------------------
# tiny real media and shards (cached: hypothesis examples reuse them)


@lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    import atexit
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="mm-llama-test-tok-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # cached for the session, removed at its end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer(CORPUS * 4, 300, out)
    return out


@lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir())


@lru_cache(maxsize=None)
def image_bytes(fmt: str = "PNG", width: int = 40, height: int = 30, shade: int = 0) -> bytes:
    rng = np.random.default_rng(shade)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def waveform(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@lru_cache(maxsize=None)
def audio_bytes(seconds: float = 0.6, rate: int = 16000, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, waveform(seconds, rate), rate, format=fmt)
    return buf.getvalue()


@lru_cache(maxsize=None)
def video_bytes(frames: int = 6, width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.full((height, width, 3), (30 * i) % 255, dtype=np.uint8)
            rgb[:, : width // 2, 0] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def image_sample(i: int, task: str = "caption") -> dict[str, bytes]:
    meta = {"question": "what colour is the circle?", "answer": "red"} if task == "vqa" else {"source": "test"}
    return {"png": image_bytes("PNG", 40 + i, 30, i), "txt": f"a red circle {i}".encode(), "json": json.dumps(meta).encode()}


def video_sample(i: int, task: str = "video_qa") -> dict[str, bytes]:
    meta = {"question": "how many shapes are there?", "answer": "two"}
    return {"mp4": video_bytes(), "txt": b"the square moves up", "json": json.dumps(meta).encode()}


def audio_sample(i: int, seconds: float = 0.6, translation: bool = True) -> dict[str, bytes]:
    meta: dict[str, Any] = {"text": f"hello world {i}", "language": "en", "duration": seconds}
    if translation:
        meta["translation"] = f"bonjour le monde {i}"
    return {"flac": audio_bytes(seconds), "json": json.dumps(meta).encode()}


def write_shards(out: Path, samples: list[dict[str, bytes]], per_shard: int = 3) -> list[str]:
    with ShardWriter(out, samples_per_shard=per_shard) as w:
        for i, files in enumerate(samples):
            w.write(f"{i:09d}", files)
    return [str(p) for p in w.shards]


def config(shards: Any, **kw: Any) -> LoaderConfig:
    base: dict[str, Any] = dict(batch_size=4, tile_size=TILE, max_tiles=2, rank=0, world_size=1, shuffle_buffer=8)
    base.update(kw)
    return LoaderConfig(shards, **base)


def collect(loader: Loader[Any]) -> tuple[list[Any], list[str]]:
    batches, sources = [], []
    for batch, src in loader.iter_with_sources():
        batches.append(batch)
        sources += src
    return batches, sources


def keys_of(sources: list[str]) -> list[str]:
    return [s.rsplit(":", 1)[1] for s in sources]


def labelled_text(tok: Tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    keep = labels != IGNORE_INDEX
    assert torch.equal(input_ids[keep], labels[keep])
    return tok.decode(labels[keep].tolist(), skip_special=True)


def text_of(batch_text: Any, b: int) -> str:
    """Row `b` of a text batch as text: padding and media placeholder ids left out."""
    tok = tokenizer()
    ids = batch_text.input_ids[b][batch_text.attention_mask[b]]
    return tok.decode([i for i in ids.tolist() if i < tok.vocab_size])


def check_text(batch_text: Any) -> None:
    ids, labels, mask = batch_text.input_ids, batch_text.labels, batch_text.attention_mask
    assert ids.shape == labels.shape == mask.shape and ids.dtype == torch.long and mask.dtype == torch.bool
    assert (labels[~mask] == IGNORE_INDEX).all()  # padding never labelled
    assert ((labels != IGNORE_INDEX).sum(dim=1) > 0).all()  # every row has labels
    assert (ids[:, 0] == tokenizer().bos_id).all()


# --------------------------------------------------------------------------------------------------
# round trips


def test_caption_round_trip(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [image_sample(i) for i in range(7)])
    loader = image_text_loader(config(shards), tokenizer_dir())  # a path works as the tokenizer
    batches, sources = collect(loader)
    assert sorted(keys_of(sources)) == [f"{i:09d}" for i in range(7)]
    assert [b.text.input_ids.shape[0] for b in batches] == [4, 3]
    tok = tokenizer()
    for batch, rows in zip(batches, [sources[:4], sources[4:]]):
        check_text(batch.text)
        B = batch.text.input_ids.shape[0]
        assert batch.images.pixels.shape == (B, 1, 2, 3, TILE, TILE)
        assert batch.images.aspect_ratio_ids.shape == (B, 1) and (batch.images.aspect_ratio_ids > 0).all()
        # 40×30 images become a 1×2 grid of tiles at most: the tile mask follows the grid
        assert torch.equal(batch.images.tile_mask.sum(-1)[:, 0], batch.images.grids[:, 0].prod(-1))
        for b, src in enumerate(rows):
            i = int(src.rsplit(":", 1)[1])
            assert labelled_text(tok, batch.text.input_ids[b], batch.text.labels[b]) == f"a red circle {i}"
            assert (batch.text.input_ids[b] == loader_media_image()).sum() == 1
    assert loader.stats.samples == 7 and loader.stats.batches == 2 and loader.stats.skipped_total == 0
    assert loader.stats.bytes > 0 and set(loader.stats.seconds) >= {"read", "decode", "transform", "tokenize", "collate"}


def loader_media_image() -> int:
    return tokenizer().vocab_size  # MediaTokens(vocab_size).image


def test_vqa_round_trip_with_jpeg(tmp_path: Path) -> None:
    samples = [image_sample(i, "vqa") for i in range(5)]
    for s in samples[:2]:
        s["jpg"] = image_bytes("JPEG", 64, 20, 9)
        del s["png"]
    shards = write_shards(tmp_path, samples)
    batches, sources = collect(image_text_loader(config(shards, batch_size=8), tokenizer(), task="vqa"))
    assert len(sources) == 5 and len(batches) == 1
    tok = tokenizer()
    batch = batches[0]
    check_text(batch.text)
    for b in range(5):
        assert labelled_text(tok, batch.text.input_ids[b], batch.text.labels[b]) == "red"
        assert "what colour is the circle?" in text_of(batch.text, b)


def test_caption_vqa_reads_each_record_as_its_json_says(tmp_path: Path) -> None:
    """`caption_vqa`: image-qa records (a ``question`` in KEY.json) train the answer, image-caption records
    the caption; both kinds of shard in one list, one batch stream."""
    captions = write_shards(tmp_path / "caption", [image_sample(i, "caption") for i in range(3)])
    questions = write_shards(tmp_path / "qa", [image_sample(i, "vqa") for i in range(4)])
    loader = image_text_loader(config(captions + questions, batch_size=8, shuffle=False), tokenizer(),
                               task="caption_vqa")
    batches, sources = collect(loader)
    assert len(sources) == 7 and len(batches) == 1
    tok, text = tokenizer(), batches[0].text
    check_text(text)
    responses = [labelled_text(tok, text.input_ids[b], text.labels[b]) for b in range(7)]
    prompts = [text_of(text, b) for b in range(7)]
    for b, source in enumerate(sources):
        if "/caption/" in source:
            i = int(source.rsplit(":", 1)[1])
            assert responses[b] == f"a red circle {i}" and "Describe this image in one sentence." in prompts[b]
        else:
            assert responses[b] == "red" and "what colour is the circle?" in prompts[b]
    assert sum("/caption/" in s for s in sources) == 3


def test_img2dataset_layout_loads(tmp_path: Path) -> None:
    """img2dataset: `00000.tar` … with 9-digit keys, KEY.jpg + KEY.txt + KEY.json (url, key, status, sizes),
    plus `.parquet` and `_stats.json` files beside the shards."""
    for shard in range(2):
        with TarWriter(str(tmp_path / f"{shard:05d}.tar")) as tw:
            for j in range(3):
                key = f"{shard:05d}{j:04d}"
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "width": 48, "height": 32, "original_width": 480,
                        "original_height": 320, "caption": f"a blue square {j}", "exif": "{}", "sha256": "0" * 64}
                tw.write({"__key__": key, "jpg": image_bytes("JPEG", 48, 32, j), "txt": f"a blue square {j}",
                          "json": json.dumps(meta)})
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"PAR1")
        (tmp_path / f"{shard:05d}_stats.json").write_text('{"count": 3}')
    loader = image_text_loader(config(str(tmp_path / "{00000..00001}.tar")), tokenizer())
    _, sources = collect(loader)
    assert sorted(keys_of(sources)) == sorted(f"{s:05d}{j:04d}" for s in range(2) for j in range(3))
    _, again = collect(image_text_loader(config(tmp_path), tokenizer()))  # the directory works too
    assert sorted(again) == sorted(sources)


def test_video_qa_round_trip(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [video_sample(i) for i in range(3)])
    loader = video_text_loader(config(shards), tokenizer(), task="video_qa", num_frames=4)
    batches, sources = collect(loader)
    assert len(sources) == 3
    batch = batches[0]
    check_text(batch.text)
    assert batch.frames.pixels.shape == (3, 4, 2, 3, TILE, TILE)
    assert batch.frame_mask.shape == (3, 4) and batch.frame_mask.all()
    assert batch.frames.tile_mask[:, :, 0].all()
    video_id = tokenizer().vocab_size + 1
    assert ((batch.text.input_ids == video_id).sum(dim=1) == 1).all()
    assert labelled_text(tokenizer(), batch.text.input_ids[0], batch.text.labels[0]) == "two"


def test_video2dataset_layout_loads(tmp_path: Path) -> None:
    with TarWriter(str(tmp_path / "00000.tar")) as tw:
        for j in range(2):
            key = f"0000{j:05d}"
            meta = {"url": f"https://example.com/v{j}.mp4", "key": key, "status": "success", "error_message": None,
                    "caption": "the square moves up", "video_metadata": {"streams": [{"codec_type": "video"}]},
                    "duration": 0.75}
            tw.write({"__key__": key, "mp4": video_bytes(), "txt": "the square moves up", "json": json.dumps(meta)})
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    loader = video_text_loader(config(tmp_path), tokenizer(), task="video_caption", num_frames=2)
    batches, sources = collect(loader)
    assert sorted(keys_of(sources)) == ["000000000", "000000001"]
    assert batches[0].frames.pixels.shape[:2] == (2, 2)
    assert labelled_text(tokenizer(), batches[0].text.input_ids[0], batches[0].text.labels[0]) == "the square moves up"


def test_asr_round_trip_and_fbank_parity(tmp_path: Path) -> None:
    samples = [audio_sample(i, seconds) for i, seconds in enumerate((0.6, 0.35, 0.5))]
    samples[2] = {"wav": _wav_8k(0.5), "json": samples[2]["json"]}  # 8 kHz WAV: resampled to 16 kHz
    shards = write_shards(tmp_path, samples)
    loader = audio_text_loader(config(shards, batch_size=8, shuffle=False), tokenizer(), task="asr",
                               max_batch_seconds=10.0)
    batches, sources = collect(loader)
    assert len(batches) == 1 and len(sources) == 3
    batch = batches[0]
    check_text(batch.text)
    assert batch.features.shape[0] == 3 and batch.features.shape[2] == 80
    assert batch.features.shape[1] == int(batch.feature_lengths.max())
    torch.testing.assert_close(batch.durations, batch.feature_lengths.float() / 100)
    tok = tokenizer()
    for b, src in enumerate(sources):
        i = int(src.rsplit(":", 1)[1])
        n = int(batch.feature_lengths[b])
        assert (batch.features[b, n:] == 0).all()
        assert labelled_text(tok, batch.text.input_ids[b], batch.text.labels[b]) == f"hello world {i}"
        assert "Repeat after me in English:" in text_of(batch.text, b)
        if i < 2:  # FLAC at 16 kHz: the features are kaldi fbank of the decoded waveform
            wave = torch.from_numpy(soundfile.read(io.BytesIO(samples[i]["flac"]), dtype="float32")[0])
            expected = fbank(wave[None] * 32768.0, num_mel_bins=80, sample_frequency=16000, frame_length=25.0,
                             frame_shift=10.0, dither=0.0, energy_floor=0.0)
            assert n == expected.shape[0]
            torch.testing.assert_close(batch.features[b, :n], expected, rtol=1e-5, atol=1e-4)
        else:
            assert n == 48  # 0.5 s at 16 kHz: 1 + (8000 - 400) // 160 frames
        speech = tok.vocab_size + 4
        assert int((batch.text.input_ids[b] == speech).sum()) == -(-(-(-n // 4)) // 2)


def _wav_8k(seconds: float) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, waveform(seconds, 8000), 8000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_ast_uses_translation_and_skips_samples_without(tmp_path: Path) -> None:
    samples = [audio_sample(i, 0.4, translation=i % 3 != 2) for i in range(6)]
    shards = write_shards(tmp_path, samples)
    loader = audio_text_loader(config(shards, batch_size=8, max_skip_fraction=0.5), tokenizer(), task="ast",
                               max_batch_seconds=10.0)
    batches, sources = collect(loader)
    assert sorted(keys_of(sources)) == [f"{i:09d}" for i in (0, 1, 3, 4)]
    assert loader.stats.skipped == {"no_translation": 2}
    tok = tokenizer()
    for batch in batches:
        for b in range(batch.text.input_ids.shape[0]):
            assert labelled_text(tok, batch.text.input_ids[b], batch.text.labels[b]).startswith("bonjour le monde")
            assert "Translate the following sentence into English:" in text_of(batch.text, b)


def test_audio_batches_respect_the_seconds_budget(tmp_path: Path) -> None:
    durations = [0.3, 1.2, 0.5, 0.9, 0.4, 1.5, 0.7, 0.35, 1.1, 0.6, 0.8, 3.5]
    shards = write_shards(tmp_path, [audio_sample(i, d) for i, d in enumerate(durations)], per_shard=4)
    budget = 2.5
    loader = audio_text_loader(config(shards, batch_size=3, max_skip_fraction=0.2), tokenizer(), task="asr",
                               max_batch_seconds=budget, bucket_buffer=6)
    batches, sources = collect(loader)
    assert len(sources) == len(durations) - 1  # the 3.5 s utterance cannot fit any batch
    assert loader.stats.skipped == {"too_long": 1}
    for batch in batches:
        rows = batch.features.shape[0]
        assert rows <= 3
        assert rows * float(batch.durations.max()) <= budget + 1e-6


# --------------------------------------------------------------------------------------------------
# splits, epochs, reproducibility


def test_two_nodes_two_workers_see_disjoint_shards_covering_the_epoch(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [image_sample(i) for i in range(16)], per_shard=2)  # 8 shards
    per_rank = []
    for rank in range(2):
        loader = image_text_loader(config(shards, rank=rank, world_size=2, num_workers=2, batch_size=2), tokenizer())
        _, sources = collect(loader)
        per_rank.append(set(sources))
        assert len(sources) == len(per_rank[-1]) == 8
        assert loader.stats.samples == 8 and loader.stats.shards == 4
    assert not per_rank[0] & per_rank[1]
    assert sorted(keys_of(list(per_rank[0] | per_rank[1]))) == [f"{i:09d}" for i in range(16)]


def test_resampled_order_is_reproducible(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [image_sample(i) for i in range(9)], per_shard=3)

    def make(seed: int, epoch: int = 0) -> Loader[Any]:
        return image_text_loader(config(shards, resampled=True, seed=seed, epoch=epoch, samples_per_epoch=10),
                                 tokenizer())

    first = make(1)
    a0 = collect(first)[1]
    a1 = collect(first)[1]  # the next epoch
    assert len(a0) == len(a1) == 10
    assert collect(make(1))[1] == a0
    assert collect(make(1, epoch=1))[1] == a1
    assert a0 != a1
    assert collect(make(2))[1] != a0


def test_samples_per_epoch_cuts_and_repeats(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [image_sample(i) for i in range(6)], per_shard=2)
    _, cut = collect(image_text_loader(config(shards, samples_per_epoch=4), tokenizer()))
    assert len(cut) == len(set(cut)) == 4
    _, repeated = collect(image_text_loader(config(shards, samples_per_epoch=14), tokenizer()))
    assert len(repeated) == 14 and len(set(repeated)) == 6
    loader = loader_for_task("caption", config(shards, shuffle=False, batch_size=6), tokenizer())
    _, ordered = collect(loader)
    assert ordered == [f"{shards[i // 2]}:{i:09d}" for i in range(6)]  # shuffle=False: shards in order


# --------------------------------------------------------------------------------------------------
# skipping and stopping


def test_bad_samples_are_skipped_logged_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_stats, "_skip_log", loader_stats._SkipLog())
    samples = [image_sample(i, "vqa") for i in range(8)]
    samples[1]["png"] = b"not an image"
    samples[2]["json"] = b"{broken"
    samples[3]["json"] = json.dumps({"question": "what colour is the circle?", "answer": " "}).encode()
    del samples[4]["png"]
    samples[5]["json"] = json.dumps({"answer": "red"}).encode()
    shards = write_shards(tmp_path, samples, per_shard=8)
    loader = image_text_loader(config(shards, max_skip_fraction=1.0), tokenizer(), task="vqa")
    with caplog.at_level(logging.WARNING, logger="mm_llama.data"):
        _, sources = collect(loader)
    assert sorted(keys_of(sources)) == [f"{i:09d}" for i in (0, 6, 7)]
    assert loader.stats.skipped == {"decode_image": 1, "bad_metadata": 1, "empty_labels": 1, "missing_image": 1,
                                    "missing_field": 1}
    assert f"{shards[0]}:000000001" in caplog.text and "decode_image" in caplog.text


def test_labels_all_masked_by_truncation_are_rejected(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [image_sample(i) for i in range(3)])
    loader = image_text_loader(config(shards, max_seq_len=5, max_skip_fraction=1.0), tokenizer())
    with pytest.raises(TooManySkippedError, match=r"empty_labels \(3\)"):
        collect(loader)


def test_too_many_skips_stop_the_loader(tmp_path: Path) -> None:
    samples = [image_sample(i) for i in range(20)]
    for s in samples[::2]:
        s["png"] = s["png"][:40]  # truncated PNG
    shards = write_shards(tmp_path, samples, per_shard=5)
    loader = image_text_loader(config(shards, min_samples_before_check=8), tokenizer())
    with pytest.raises(TooManySkippedError) as err:
        collect(loader)
    message = str(err.value)
    assert "decode_image" in message and "max_skip_fraction=0.1" in message and ".tar:0000000" in message
    # the same data under a tolerant limit: the epoch completes and the counts are there
    tolerant = image_text_loader(config(shards, max_skip_fraction=0.6), tokenizer())
    assert len(collect(tolerant)[1]) == 10 and tolerant.stats.skipped == {"decode_image": 10}


def test_resampled_endless_stream_over_bad_data_stops(tmp_path: Path) -> None:
    samples = [image_sample(i) for i in range(4)]
    for s in samples:
        s["png"] = b"\x89PNG garbage"
    shards = write_shards(tmp_path, samples, per_shard=2)
    loader = image_text_loader(config(shards, resampled=True, max_skip_fraction=1.0, min_samples_before_check=30),
                               tokenizer())
    with pytest.raises(TooManySkippedError, match="not one sample"):
        collect(loader)


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LoaderConfig(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="max_skip_fraction"):
        LoaderConfig(tmp_path, max_skip_fraction=1.5)
    with pytest.raises(ValueError, match="both rank and world_size"):
        LoaderConfig(tmp_path, rank=1)
    with pytest.raises(ValueError, match="no shards match"):
        image_text_loader(LoaderConfig(str(tmp_path / "x-*.tar")), tokenizer())
    shards = write_shards(tmp_path, [image_sample(0)])
    with pytest.raises(ValueError, match="task must be one of"):
        image_text_loader(LoaderConfig(shards), tokenizer(), task="asr")
    with pytest.raises(ValueError, match="unknown task"):
        loader_for_task("ocr", LoaderConfig(shards), tokenizer())


# --------------------------------------------------------------------------------------------------
# fuzz: corrupted members and tar headers never crash the loader and are always accounted for

FAMILIES = {
    "image": (lambda i: image_sample(i), "png", "caption"),
    "video": (lambda i: video_sample(i), "mp4", "video_qa"),
    "audio": (lambda i: audio_sample(i, 0.3), "flac", "asr"),
}
N_FUZZ = 4  # samples per dataset: shard 0 holds 0..1 (one of them corrupted), shard 1 holds 2..3 (clean)


def _fuzz_loader(shards: list[str], task: str) -> Loader[Any]:
    cfg = config(shards, batch_size=2, shuffle=False, max_skip_fraction=1.0, min_samples_before_check=1000)
    return loader_for_task(task, cfg, tokenizer(), **({"num_frames": 2} if task == "video_qa" else {}))


def _corrupt(data: bytes, edits: list[tuple[float, int]], cut: float | None) -> bytes:
    out = bytearray(data)
    for where, value in edits:
        if out:
            out[min(int(where * len(out)), len(out) - 1)] = value
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


_edits = st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 255)), min_size=1, max_size=8)
# MM_LLAMA_FUZZ_EXAMPLES=500 (and MM_LLAMA_FUZZ_RANDOM=1) for a longer, randomised hunt
_fuzz_settings = settings(max_examples=int(os.environ.get("MM_LLAMA_FUZZ_EXAMPLES", "12")), deadline=None,
                          derandomize=os.environ.get("MM_LLAMA_FUZZ_RANDOM", "0") != "1",
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@_fuzz_settings
@given(family=st.sampled_from(sorted(FAMILIES)), member=st.sampled_from(["media", "json", "txt"]),
       victim=st.integers(0, 1), edits=_edits, cut=st.one_of(st.none(), st.floats(0, 1, allow_nan=False)))
def test_fuzz_corrupt_members(tmp_path_factory: pytest.TempPathFactory, family: str, member: str, victim: int,
                              edits: list[tuple[float, int]], cut: float | None) -> None:
    make, media_ext, task = FAMILIES[family]
    samples = [make(i) for i in range(N_FUZZ)]
    ext = media_ext if member == "media" else member
    if ext in samples[victim]:
        samples[victim][ext] = _corrupt(samples[victim][ext], edits, cut) or b"\0"
    shards = write_shards(tmp_path_factory.mktemp("fuzz"), samples, per_shard=2)
    loader = _fuzz_loader(shards, task)
    _, sources = collect(loader)
    assert len(sources) + loader.stats.skipped_total == N_FUZZ  # every sample used or counted, once
    assert {f"{i:09d}" for i in (2, 3)} <= set(keys_of(sources))


@_fuzz_settings
@given(family=st.sampled_from(sorted(FAMILIES)), header=st.integers(0, 5), edits=_edits,
       cut=st.one_of(st.none(), st.floats(0, 1, allow_nan=False)))
def test_fuzz_corrupt_tar_headers(tmp_path_factory: pytest.TempPathFactory, family: str, header: int,
                                  edits: list[tuple[float, int]], cut: float | None) -> None:
    make, _, task = FAMILIES[family]
    shards = write_shards(tmp_path_factory.mktemp("fuzz"), [make(i) for i in range(N_FUZZ)], per_shard=2)
    path = Path(shards[0])
    with tarfile.open(path) as tf:
        offsets = [m.offset for m in tf.getmembers()]
    data = bytearray(path.read_bytes())
    start = offsets[header % len(offsets)]
    data[start:start + 512] = _corrupt(bytes(data[start:start + 512]), edits, None)
    if cut is not None:
        data = data[: int(cut * len(data))]
    path.write_bytes(bytes(data))
    loader = _fuzz_loader(shards, task)
    _, sources = collect(loader)
    used = set(keys_of(sources))
    assert {f"{i:09d}" for i in (2, 3)} <= used  # the clean shard is unaffected
    lost = N_FUZZ - len(sources)
    assert lost == 0 or loader.stats.skipped_total >= 1  # nothing disappears without being counted
    assert len(sources) == len(used)  # no sample twice
