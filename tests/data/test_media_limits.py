"""Limits on what one sample may cost, and "a video member must be a video" (issue 11 E, F, loader side):
a deeply nested KEY.json, an image whose header declares too many pixels and a still image stored as
`.mp4` are counted skips with a reason, in the loader and in `mm-llama bench data`."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from mm_llama.data.decoders import MAX_IMAGE_PIXELS, DecodeError, decode_image, decode_video, is_image_format
from mm_llama.data.pipelines import image_text_loader, video_text_loader
from tests.data.test_bench import run_bench
from tests.data.test_pipelines import (
    collect,
    config,
    image_bytes,
    image_sample,
    keys_of,
    tokenizer,
    video_sample,
    write_shards,
)


def huge_png(width: int = 8000, height: int = 6000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_image_area_is_checked_before_decoding() -> None:
    data = huge_png()
    assert len(data) < 10_000 and 8000 * 6000 > MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match=r"8000x6000 = 48.0 megapixels, over the limit of 40 megapixels"):
        decode_image(data, "s.tar:k.png")
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded
    assert decode_image(huge_png(6000, 6000), "ok.png").size == (6000, 6000)  # 36 MP: under the limit


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_still_image_is_not_a_video(fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 60)).save(buf, fmt)
    with pytest.raises(DecodeError, match="still image .* not a video container"):
        decode_video(buf.getvalue(), "s.tar:k.mp4", 2)
    assert is_image_format("png_pipe") and is_image_format("image2") and not is_image_format("mov,mp4,m4a,3gp,3g2,mj2")


def test_loader_skips_deep_json_and_huge_images(tmp_path: Path) -> None:
    samples = [image_sample(i) for i in range(5)]
    samples[1]["json"] = ('{"x": ' + "[" * 70 + "]" * 70 + "}").encode()  # parses, but deeper than 64
    samples[2]["json"] = ("[" * 100_000 + "]" * 100_000).encode()  # RecursionError in json
    samples[3]["png"] = huge_png()
    shards = write_shards(tmp_path, samples, per_shard=5)
    loader = image_text_loader(config(shards, shuffle=False, max_skip_fraction=1.0), tokenizer())
    _, sources = collect(loader)
    assert keys_of(sources) == ["000000000", "000000004"]
    assert loader.stats.skipped == {"bad_metadata": 2, "decode_image": 1}
    messages = [r.message for r in loader.stats.recent]
    assert sum("nested deeper than the limit of 64" in m for m in messages) == 2
    assert any("megapixels, over the limit" in m for m in messages)


def test_loader_skips_an_image_stored_as_mp4(tmp_path: Path) -> None:
    samples = [video_sample(i) for i in range(3)]
    samples[1]["mp4"] = image_bytes("JPEG", 32, 24)
    shards = write_shards(tmp_path, samples, per_shard=3)
    loader = video_text_loader(config(shards, shuffle=False, max_skip_fraction=1.0), tokenizer(), task="video_qa",
                               num_frames=2)
    _, sources = collect(loader)
    assert keys_of(sources) == ["000000000", "000000002"]
    assert loader.stats.skipped == {"decode_video": 1}
    assert "jpeg_pipe" in loader.stats.recent[-1].message


def test_bench_survives_a_deeply_nested_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = [image_sample(i) for i in range(4)]
    for i in (0, 1, 2):  # the resampled bench surely meets some
        samples[i]["json"] = ("[" * 100_000 + "]" * 100_000).encode()  # RecursionError in json.loads
    samples[3]["json"] = json.dumps({"caption": "x", "deep": [[[[[]]]]]}).encode()
    write_shards(tmp_path, samples, per_shard=2)
    code = run_bench(["bench", "data", str(tmp_path), "--task", "caption", "--workers", "0", "--batches", "2",
                      "--batch-size", "2", "--tile-size", "28", "--max-tiles", "2"])
    assert code == 0
    assert "bad_metadata" in capsys.readouterr().out
