"""Manifest → shards → read back (plain webdataset / tarfile); bad lines skipped and listed; `mm-llama shards`."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

from mm_llama.commands import shards as shards_command
from mm_llama.data.manifest import ManifestError, write_shards
from tests.data.test_decoders import make_audio, make_image, make_mp4, sine


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tiny real media files, good and bad."""
    root = tmp_path_factory.mktemp("media")
    m = root / "media"
    m.mkdir()
    (m / "red.png").write_bytes(make_image("PNG", size=(24, 16)))
    (m / "photo.jpg").write_bytes(make_image("JPEG", size=(20, 10)))
    (m / "really_png.jpg").write_bytes(make_image("PNG", size=(8, 8)))
    (m / "pic.webp").write_bytes(make_image("WEBP", size=(12, 6), lossless=True))
    (m / "anim.gif").write_bytes(make_image("GIF", size=(8, 8), mode="P", color=3))
    (m / "corrupt.jpg").write_bytes(make_image("JPEG")[:60])
    (m / "empty.png").write_bytes(b"")
    (m / "speech16.wav").write_bytes(make_audio(sine(0.5, 16000), 16000))
    stereo = np.stack([sine(0.3, 44100), sine(0.3, 44100, 660)], axis=1)
    (m / "speech44.flac").write_bytes(make_audio(stereo, 44100, "FLAC"))
    (m / "speech.ogg").write_bytes(make_audio(sine(0.3, 16000), 16000, "OGG", "VORBIS"))
    (m / "clip.mp4").write_bytes(make_mp4(10))
    (m / "broken.mp4").write_bytes(make_mp4(10)[:300])
    return root


def write_manifest(path: Path, lines: list[Any]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
            f.write(b"\n")
    return path


GOOD = [
    {"image": "media/red.png", "caption": "a red square", "key": "img-red", "id": 17},
    {"image": "media/photo.jpg", "question": "what colour?", "answer": "red"},
    {"image": "media/really_png.jpg", "caption": "named jpg, stored as png"},
    {"image": "media/pic.webp", "caption": "a webp"},
    {"audio": "media/speech16.wav", "text": "hello there", "language": "en"},
    {"audio": "media/speech44.flac", "text": "bonjour", "language": "fr", "translation": "hello"},
    {"video": "media/clip.mp4", "caption": "colours change"},
]


def read_samples(out: Path, stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    urls = [str(out / name) for name in stats["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_round_trip_all_layouts(media: Path, tmp_path: Path) -> None:
    manifest = write_manifest(media / "good.jsonl", GOOD)
    out = tmp_path / "out"
    stats = write_shards(manifest, out, progress=False)

    assert stats["samples"] == 7 and stats["skipped"] == 0 and stats["skipped_samples"] == []
    assert stats["shards"] == ["shard-000000.tar"]
    assert stats["layouts"] == {"image-caption": 3, "image-qa": 1, "audio-text": 2, "video-caption": 1}
    assert stats["bytes"] == (out / "shard-000000.tar").stat().st_size
    assert json.loads((out / "stats.json").read_text()) == stats
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "stats.json"]  # no .tmp left

    s = read_samples(out, stats)
    assert list(s) == ["img-red", "000000002", "000000003", "000000004", "000000005", "000000006", "000000007"]

    red = s["img-red"]
    assert set(red) - {"__key__", "__url__", "__local_path__"} == {"png", "txt", "json"}
    assert red["png"] == (media / "media/red.png").read_bytes() and red["txt"] == b"a red square"
    assert json.loads(red["json"]) == {"key": "img-red", "caption": "a red square", "width": 24, "height": 16,
                                       "source": "media/red.png", "id": 17}

    qa = s["000000002"]
    assert "jpg" in qa and "txt" not in qa
    assert json.loads(qa["json"]) == {"key": "000000002", "question": "what colour?", "answer": "red",
                                      "width": 20, "height": 10, "source": "media/photo.jpg"}
    assert "png" in s["000000003"] and "jpg" not in s["000000003"]  # extension from the content
    assert "webp" in s["000000004"]

    wav = json.loads(s["000000005"]["json"])
    assert "wav" in s["000000005"]
    assert wav == {"key": "000000005", "text": "hello there", "language": "en", "duration": 0.5,
                   "sample_rate": 16000, "channels": 1, "source": "media/speech16.wav"}
    flac = json.loads(s["000000006"]["json"])
    assert "flac" in s["000000006"] and flac["translation"] == "hello"
    assert (flac["sample_rate"], flac["channels"], flac["duration"]) == (44100, 2, pytest.approx(0.3))

    video = s["000000007"]
    assert video["mp4"] == (media / "media/clip.mp4").read_bytes() and video["txt"] == b"colours change"
    meta = json.loads(video["json"])
    assert (meta["frames"], meta["width"], meta["height"], meta["duration"]) == (10, 64, 48, pytest.approx(1.0))


def test_bad_lines_are_skipped_and_listed(media: Path, tmp_path: Path) -> None:
    lines: list[Any] = [
        {"image": "media/red.png", "caption": "fine", "key": "ok"},                       # 1
        "{not json",                                                                      # 2
        {"text": "no media"},                                                             # 3
        {"image": "media/missing.png", "caption": "x"},                                   # 4
        {"image": "media/corrupt.jpg", "caption": "x"},                                   # 5
        {"image": "media/red.png", "caption": "   "},                                     # 6
        "",                                                                               # 7 blank: ignored
        ["a", "list"],                                                                    # 8
        {"image": "media/red.png", "caption": "dup", "key": "ok"},                        # 9
        {"image": "media/red.png", "caption": "c", "question": "q", "answer": "a"},       # 10
        {"image": "media/anim.gif", "caption": "gif"},                                    # 11
        {"audio": "media/speech.ogg", "text": "t", "language": "en"},                     # 12
        {"audio": "media/speech16.wav", "text": "t"},                                     # 13
        {"video": "media/broken.mp4", "caption": "x"},                                    # 14
        {"image": "media/red.png", "caption": "x", "width": 3},                           # 15
        b"\xff\xfe not utf-8",                                                            # 16
        {"image": "media/red.png", "caption": "x", "key": "a.b"},                         # 17
        {"image": "media/empty.png", "caption": "x"},                                     # 18
        {"image": "media/red.png", "audio": "media/speech16.wav", "caption": "x"},       # 19
        {"image": 5, "caption": "x"},                                                     # 20
        {"image": "media/red.png", "caption": 3},                                         # 21
        {"video": "media/red.png", "caption": "not a video"},                             # 22
        {"image": "media/", "caption": "a folder"},                                       # 23
    ]
    manifest = write_manifest(media / "mixed.jsonl", lines)
    stats = write_shards(manifest, tmp_path / "out", progress=False)
    assert stats["samples"] == 1
    reasons = {s["line"]: (s["file"], s["reason"]) for s in stats["skipped_samples"]}
    assert stats["skipped"] == len(reasons) == 21 and 1 not in reasons and 7 not in reasons
    expected = {
        2: "invalid JSON", 3: "unknown layout", 4: "no such file", 5: "not a decodable image",
        6: "'caption' is empty", 8: "expected a JSON object", 9: "already written", 10: "ambiguous layout",
        11: "GIF image", 12: "OGG audio", 13: "missing 'language'", 14: "not a readable video container",
        15: "computed by the writer", 16: "not valid UTF-8", 17: "no dots", 18: "empty (0 bytes)",
        19: "several media fields", 20: "non-empty file path", 21: "must be a string",
        22: "png_pipe' container; shards store MP4", 23: "not a regular file",
    }
    for line, needle in expected.items():
        assert needle in reasons[line][1], (line, reasons[line])
    media_dir = (media / "media").resolve()
    assert reasons[4][0] == str(media_dir / "missing.png") and reasons[5][0] == str(media_dir / "corrupt.jpg")
    assert reasons[14][0] == str(media_dir / "broken.mp4") and reasons[2][0] is None
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk["skipped"] == 21 and on_disk["skipped_samples"] == stats["skipped_samples"]


def test_absolute_paths_boundaries_and_determinism(media: Path, tmp_path: Path) -> None:
    lines = [{**line, **{k: str((media / v).resolve()) for k, v in line.items() if k in ("image", "audio", "video")}}
             for line in GOOD]
    manifest = write_manifest(tmp_path / "elsewhere.jsonl", lines)
    a = write_shards(manifest, tmp_path / "a", samples_per_shard=3, progress=False)
    b = write_shards(manifest, tmp_path / "b", samples_per_shard=3, progress=False)
    assert a["samples"] == 7 and a["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in a["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "shard-000002.tar") as tar:
        assert {m.name.split(".")[0] for m in tar.getmembers()} == {"000000007"}

    small = write_shards(manifest, tmp_path / "small", max_shard_mb=0.03, progress=False)
    assert small["max_shard_bytes"] == 30_000 and 1 < len(small["shards"]) < 7
    sizes = []
    for name in small["shards"]:
        path = tmp_path / "small" / name
        with tarfile.open(path) as tar:
            keys = {m.name.split(".")[0] for m in tar.getmembers()}
        sizes.append(path.stat().st_size)
        assert sizes[-1] <= 30_000 or len(keys) == 1  # only a lone sample may exceed the limit
    assert small["bytes"] == sum(sizes)
    assert len(read_samples(tmp_path / "small", small)) == 7


def test_unusable_manifest_and_options(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        write_shards(tmp_path / "nope.jsonl", tmp_path / "out", progress=False)
    with pytest.raises(ManifestError, match="not a file"):
        write_shards(tmp_path, tmp_path / "out", progress=False)
    empty = write_manifest(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="max_shard_mb"):
        write_shards(empty, tmp_path / "out", max_shard_mb=0, progress=False)
    stats = write_shards(empty, tmp_path / "out", progress=False)
    assert (stats["samples"], stats["shards"], stats["skipped"]) == (0, [], 0)


def test_progress_bar(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(media / "one.jsonl", GOOD[:1])
    write_shards(manifest, tmp_path / "out", progress=True)
    assert "1/1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# command line


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    shards_command.add_parser(sub)
    return p


def run_cli(*argv: str) -> int:
    args = make_parser().parse_args(["shards", *argv])
    return args.run(args)


def test_cli_exit_codes(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_manifest(media / "cli-good.jsonl", GOOD)
    assert run_cli(str(good), str(tmp_path / "a"), "--samples-per-shard", "4", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "wrote 7 samples in 2 shard(s)" in out and "skipped" not in out

    bad = write_manifest(media / "cli-bad.jsonl", [GOOD[0], {"image": "media/missing.png", "caption": "x"}])
    assert run_cli(str(bad), str(tmp_path / "b"), "--max-shard-mb", "5", "--no-progress") == 1
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "skipped 1 line(s)" in out and "line 2:" in out and "missing.png" in out

    assert run_cli(str(tmp_path / "missing.jsonl"), str(tmp_path / "c"), "--no-progress") == 2
    assert "does not exist" in capsys.readouterr().err
    # existing shards: refuse (2), then --overwrite
    assert run_cli(str(good), str(tmp_path / "a"), "--no-progress") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(str(good), str(tmp_path / "a"), "--overwrite", "--no-progress") == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-000000.tar", "stats.json"]


def test_cli_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shards_parser = sub.choices["shards"]
    for action in shards_parser._actions:
        assert action.help, action.dest
    for bad in (["--samples-per-shard", "0"], ["--max-shard-mb", "-1"], ["--samples-per-shard", "x"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["shards", "m.jsonl", "out", *bad])
        assert e.value.code == 2
    assert "positive" in capsys.readouterr().err
    args = parser.parse_args(["shards", "m.jsonl", "out"])
    assert (args.samples_per_shard, args.max_shard_mb, args.overwrite) == (1000, None, False)
    help_text = io.StringIO()
    shards_parser.print_help(help_text)
    assert "--samples-per-shard" in help_text.getvalue() and "stats.json" in help_text.getvalue()


def test_a_conversation_line_becomes_an_image_qa_record_with_turns(media: Path, tmp_path: Path) -> None:
    turns = [{"question": "what colour?", "answer": "red"}, {"question": "how many?", "answers": ["1", "one"]}]
    lines = [{"image": "media/red.png", "turns": turns, "key": "chat"},
             {"image": "media/red.png", "turns": [{"question": "q?"}]},
             {"image": "media/red.png", "turns": turns, "question": "also?", "answer": "no"},
             {"image": "media/red.png", "turns": turns, "caption": "a red square"}]
    stats = write_shards(write_manifest(media / "chat.jsonl", lines), tmp_path / "out", progress=False)
    assert stats["samples"] == 1 and stats["layouts"]["image-qa"] == 1
    meta = json.loads(read_samples(tmp_path / "out", stats)["chat"]["json"])
    assert meta["turns"] == turns and "question" not in meta
    reasons = [s["reason"] for s in stats["skipped_samples"]]
    assert "'turns'" in reasons[0] and "no 'answer'" in reasons[0]
    assert "has both 'turns' and 'question'/'answer'" in reasons[1]
    assert reasons[2].startswith("ambiguous layout")
