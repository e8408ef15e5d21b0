"""`mm-llama shards` against hostile manifests and failed reruns (issue 11 C, D, E, F on the writer side):
a bad line is skipped with its line number, never an abort; `--overwrite` replaces the old shards only
after the new run succeeded."""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mm_llama.data import manifest as manifest_module
from mm_llama.data.json_limits import MAX_JSON_DEPTH, JSONLimitError, loads_limited
from mm_llama.data.manifest import ManifestError, write_shards
from mm_llama.data.shard_writer import ShardWriter
from tests.data.test_decoders import make_image, make_mp4
from tests.data.test_manifest import run_cli, write_manifest


@lru_cache(maxsize=None)
def huge_png() -> bytes:
    """A 6 KB PNG declaring 8000 x 6000 = 48 megapixels (over MAX_IMAGE_PIXELS)."""
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def media(tmp_path: Path) -> Path:
    m = tmp_path / "media"
    m.mkdir()
    (m / "red.png").write_bytes(make_image("PNG", size=(24, 16)))
    (m / "clip.mp4").write_bytes(make_mp4(6))
    (m / "photo.mp4").write_bytes(make_image("JPEG", size=(24, 16)))  # a JPEG named .mp4
    (m / "huge.png").write_bytes(huge_png())
    return tmp_path


def good(i: int) -> dict[str, Any]:
    return {"image": "media/red.png", "caption": f"a red square {i}", "key": f"ok{i}"}


# --------------------------------------------------------------------------------------------------
# C: one bad line never costs the lines around it


def test_hostile_lines_are_skipped_with_their_line_numbers(media: Path) -> None:
    lines: list[Any] = [
        good(0),
        '{"image": "media/red.png", "caption": "lone \\ud800 surrogate"}',
        '{"image": "media/red.png", "caption": "big", "n": ' + "9" * 5000 + "}",
        '{"image": "media/red.png", "caption": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"image": "media/red.png", "caption": "deep", "x": ' + "[" * 70 + "]" * 70 + "}",
        '{"image": "media/red.png", "caption": "key \\udfff", "key": "k"}',
        good(1),
    ]
    manifest = write_manifest(media / "m.jsonl", lines)
    stats = write_shards(manifest, media / "out", progress=False)
    assert stats["samples"] == 2 and stats["skipped"] == 5
    reasons = {s["line"]: s["reason"] for s in stats["skipped_samples"]}
    assert "lone surrogate" in reasons[2] and "\\ud800" in reasons[2]
    assert "4300 digits" in reasons[3] and "as strings" in reasons[3]
    assert "nested deeper than the limit of 64" in reasons[4] and "nested deeper" in reasons[5]
    assert "lone surrogate" in reasons[6]
    on_disk = json.loads((media / "out" / "stats.json").read_text(encoding="utf-8"))
    assert on_disk["skipped"] == 5 and on_disk["shard_samples"] == {"shard-000000.tar": 2}


def test_unexpected_error_in_one_line_is_a_skip(media: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = manifest_module._build

    def flaky(line: dict[str, Any], line_no: int, base: Path) -> Any:
        if line_no == 2:
            raise OverflowError("something odd")
        return real(line, line_no, base)

    monkeypatch.setattr(manifest_module, "_build", flaky)
    stats = write_shards(write_manifest(media / "m.jsonl", [good(0), good(1), good(2)]), media / "out",
                         progress=False)
    assert stats["samples"] == 2
    assert stats["skipped_samples"] == [{"line": 2, "file": None,
                                         "reason": "cannot use this line (OverflowError: something odd)"}]


def test_loads_limited() -> None:
    assert loads_limited(b'{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}
    assert loads_limited("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    for bad, reason in [("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nested deeper"),
                        (b"\xff{}", "not UTF-8"), ("{", "invalid JSON"), ('{"\\ud800": 1}', "lone surrogate")]:
        with pytest.raises(JSONLimitError, match=reason):
            loads_limited(bad)


# --------------------------------------------------------------------------------------------------
# D: --overwrite replaces the old shards only after the new run succeeded


def first_run(media: Path) -> tuple[Path, dict[str, bytes]]:
    out = media / "out"
    write_shards(write_manifest(media / "first.jsonl", [good(i) for i in range(5)]), out, samples_per_shard=2,
                 progress=False)
    return out, {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_failed_overwrite_keeps_the_old_shards(media: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = first_run(media)
    assert sorted(before) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "stats.json"]
    real, calls = ShardWriter.write, []

    def disk_full(self: ShardWriter, key: str, files: dict[str, bytes]) -> None:
        calls.append(key)
        if len(calls) == 4:  # after the new run finished a shard
            raise OSError(28, "No space left on device")
        real(self, key, files)

    monkeypatch.setattr(ShardWriter, "write", disk_full)
    second = write_manifest(media / "second.jsonl", [good(i) for i in range(10, 16)])
    with pytest.raises(OSError, match="No space left"):
        write_shards(second, out, samples_per_shard=2, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before  # no staging folder left either
    monkeypatch.undo()
    assert run_cli(str(second), str(out), "--overwrite", "--no-progress", "--samples-per-shard", "4") == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "stats.json"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 6 and stats["shard_samples"] == {"shard-000000.tar": 4, "shard-000001.tar": 2}


def test_overwrite_with_nothing_to_write_keeps_the_old_shards(media: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    out, before = first_run(media)
    bad = write_manifest(media / "bad.jsonl", [{"image": "media/missing.png", "caption": "x"}])
    with pytest.raises(ManifestError, match="left as they were"):
        write_shards(bad, out, overwrite=True, progress=False)
    assert run_cli(str(bad), str(out), "--overwrite", "--no-progress") == 2
    assert "line 1: " in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before


def test_interrupted_overwrite_keeps_the_old_shards(media: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, before = first_run(media)

    def interrupt(line: dict[str, Any], line_no: int, base: Path) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest_module, "_build", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_shards(write_manifest(media / "m.jsonl", [good(9)]), out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before


# --------------------------------------------------------------------------------------------------
# E, F: decoded image area and "a video must be a video", on the writer side


def test_huge_image_and_image_as_video_are_skipped(media: Path) -> None:
    manifest = write_manifest(media / "m.jsonl", [
        {"image": "media/huge.png", "caption": "48 megapixels"},
        {"video": "media/photo.mp4", "caption": "a jpeg named mp4"},
        {"video": "media/clip.mp4", "caption": "a real clip"},
    ])
    stats = write_shards(manifest, media / "out", progress=False)
    assert stats["samples"] == 1 and stats["layouts"]["video-caption"] == 1
    reasons = {s["line"]: s["reason"] for s in stats["skipped_samples"]}
    assert "8000x6000 = 48.0 megapixels, over the limit of 40 megapixels" in reasons[1]
    assert "jpeg_pipe" in reasons[2]


def test_overwrite_removes_staging_left_by_a_killed_run(media: Path) -> None:
    out, _ = first_run(media)
    (out / ".shards-new-killed").mkdir()
    (out / ".shards-new-killed" / "shard-000000.tar").write_bytes(b"partial")
    write_shards(write_manifest(media / "m.jsonl", [good(7)]), out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "stats.json"]
