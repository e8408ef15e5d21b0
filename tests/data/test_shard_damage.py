"""Shard-level damage (issue 11 A, B): nothing is lost without a count, and a loader that can read
nothing stops with a clear error instead of spinning.

Every test that iterates a resampled (endless) source runs under `signal.alarm`, so a regression
fails after a few seconds instead of hanging CI.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import webdataset as wds

from mm_llama.data.loader_stats import LoaderStats, StatsRecorder
from mm_llama.data.shard_source import (
    ShardSource,
    UnreadableShardsError,
    check_tar_end,
    expected_samples,
    inspect_tar,
    tar_samples,
)
from tests.data.shard_helpers import member_offsets, write_text_shards

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


class _Hang(Exception):
    pass


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail (instead of hanging) if the test runs longer than 20 s."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise _Hang("the loader did not stop within 20 s: it is spinning over unreadable shards")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read(shards: list[str], recorder: StatsRecorder, **kw: object) -> list[str]:
    source = ShardSource(shards, rank=0, world_size=1, shuffle=False, recorder=recorder, **kw)  # type: ignore[arg-type]
    return [s["__key__"] for s in wds.DataPipeline(*tar_samples(source))]


# --------------------------------------------------------------------------------------------------
# A: truncation at a member boundary, counts before / after the damage, trailing data


@pytest.mark.parametrize("with_stats", [True, False])
def test_tar_cut_at_member_boundary_is_counted(tmp_path: Path, with_stats: bool) -> None:
    shards = write_text_shards(tmp_path, 8, 4, stats=with_stats)
    offsets = member_offsets(shards[0])  # s0000.json s0000.txt s0001.json ...
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: offsets[4]])  # ends right after s0001.txt: no end-of-archive marker
    assert "without its end-of-archive marker" in (check_tar_end(shards[0]) or "")
    recorder = StatsRecorder()
    keys = read(shards, recorder)
    assert keys == ["s0000", "s0001", "s0004", "s0005", "s0006", "s0007"]
    total = recorder.total
    assert total.skipped["tar"] == 1
    message = total.recent[-1].message
    assert "2 sample(s) of this shard were read before it" in message
    if with_stats:
        assert "2 lost after it (stats.json: 4 in the shard)" in message
        assert (total.lost, total.lost_unknown) == (2, 0)
        assert "2 sample(s) lost after damaged archives" in total.summary()
    else:
        assert "the rest of the shard is lost (unknown count)" in message
        assert (total.lost, total.lost_unknown) == (0, 1)
        assert "the rest of 1 damaged shard(s) lost (unknown count)" in total.summary()


def test_tar_cut_mid_member_records_read_and_lost(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 40, 20, stats=True)
    offsets = member_offsets(shards[0])
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: offsets[21] + 512 + 3])  # inside the data of s0010.txt
    recorder = StatsRecorder()
    keys = read(shards, recorder)
    assert keys[:10] == [f"s{i:04d}" for i in range(10)] and keys[-20:] == [f"s{i:04d}" for i in range(20, 40)]
    total = recorder.total
    assert total.skipped["tar"] == 1
    # s0010's json was read before the cut (it reaches the pipeline incomplete): 11 read, 9 lost
    assert "11 sample(s) of this shard were read before it, 9 lost after it (stats.json: 20" in total.recent[-1].message
    assert total.lost == 9
    assert total.unusable == 10  # one archive event + 9 samples known lost


def test_expected_samples_from_old_stats_json(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 7, 3, stats=False)
    (tmp_path / "stats.json").write_text(json.dumps({  # written before shard_samples existed
        "samples": 7, "shards": [Path(s).name for s in shards], "samples_per_shard": 3, "max_shard_bytes": None}))
    assert [expected_samples(s) for s in shards] == [3, 3, 1]
    (tmp_path / "stats.json").write_text(json.dumps({  # a size limit: counts cannot be derived
        "samples": 7, "shards": [Path(s).name for s in shards], "samples_per_shard": 3, "max_shard_bytes": 9}))
    assert expected_samples(shards[0]) is None
    (tmp_path / "stats.json").write_text("[[[[")
    assert expected_samples(shards[0]) is None


def test_bytes_after_the_end_marker_are_not_lost_members(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = write_text_shards(tmp_path, 8, 4, stats=True)
    with open(shards[0], "ab") as f:
        f.write(b"\0" * 4096 + b"trailing garbage that is no tar header" * 20)
    assert check_tar_end(shards[0]) is None
    assert "trailing data" in (inspect_tar(shards[0]).trailing or "")
    recorder = StatsRecorder()
    with caplog.at_level("INFO", logger="mm_llama.data"):
        keys = read(shards, recorder)
        read(shards, recorder)  # noted once per shard, not per pass
    assert len(keys) == 8 and recorder.total.skipped_total == 0 and recorder.total.lost == 0
    assert sum("trailing data" in r.getMessage() for r in caplog.records) == 1


def test_members_hidden_after_zero_blocks_are_counted(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 8, 4, stats=True)
    offsets = member_offsets(shards[0])
    data = bytearray(Path(shards[0]).read_bytes())
    data[offsets[4]:offsets[4] + 1024] = b"\0" * 1024  # s0002.json's header and data zeroed: an early end
    Path(shards[0]).write_bytes(bytes(data))
    assert "member header follows" in (check_tar_end(shards[0]) or "")
    recorder = StatsRecorder()
    assert read(shards, recorder)[:2] == ["s0000", "s0001"]
    assert recorder.total.skipped["tar"] == 1 and recorder.total.lost == 2


# --------------------------------------------------------------------------------------------------
# B: a resampled source over shards it cannot read stops, naming them


def unreadable_shards(folder: Path) -> list[str]:
    folder.mkdir()
    write_text_shards(folder, 4, 4, stats=False)
    good = (folder / "shard-000000.tar").read_bytes()
    (folder / "shard-000000.tar").write_bytes(b"")  # 0 bytes
    (folder / "shard-000001.tar").write_bytes(good[:100])  # truncated inside the first header
    (folder / "shard-000002.tar").write_bytes(LFS_POINTER)
    return [str(folder / f"shard-00000{i}.tar") for i in range(3)]


def test_resampled_source_of_unreadable_shards_raises(tmp_path: Path, deadline: None) -> None:
    shards = unreadable_shards(tmp_path / "bad")
    recorder = StatsRecorder()
    with pytest.raises(UnreadableShardsError) as err:
        read(shards, recorder, resampled=True)
    message = str(err.value)
    assert "without finding a single sample" in message and "every one of its 3 shard(s)" in message
    assert "0 bytes: an empty file" in message
    assert "git-lfs pointer" in message
    assert "shard-000001.tar (" in message
    assert recorder.total.shards < 60  # stopped after about one pass, not at the stall limit


def test_resampled_loader_of_unreadable_shards_raises(tmp_path: Path, deadline: None) -> None:
    from tests.data.test_pipelines import config, tokenizer

    from mm_llama.data.pipelines import image_text_loader

    shards = unreadable_shards(tmp_path / "bad")
    loader = image_text_loader(config(shards, resampled=True, samples_per_epoch=16, max_skip_fraction=1.0),
                               tokenizer())
    with pytest.raises(UnreadableShardsError, match="git-lfs pointer"):
        list(loader)


def test_stall_limit_stops_before_a_full_pass(tmp_path: Path, deadline: None) -> None:
    shards = unreadable_shards(tmp_path / "bad")
    with pytest.raises(UnreadableShardsError, match=r"drew 2 shards in a row \(stall_limit=2\)"):
        read(shards, StatsRecorder(), resampled=True, stall_limit=2)


def test_loader_stats_count_lost_samples_in_the_fraction() -> None:
    stats = LoaderStats(samples=10, lost=5)
    stats.skipped["tar"] = 1
    assert stats.seen == 16 and stats.unusable == 6
    assert "6 of 16 samples" in stats.explain(0.1) and "5 sample(s) lost after damaged archives" in stats.explain()
    assert stats.as_dict()["lost"] == 5 and LoaderStats().merge(stats).lost == 5


def test_bench_data_on_unreadable_shards_stops_with_an_error(tmp_path: Path, deadline: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from mm_llama.cli import main

    unreadable_shards(tmp_path / "bad")
    code = main(["bench", "data", str(tmp_path / "bad"), "--task", "caption", "--workers", "1", "--batches", "2",
                 "--batch-size", "2", "--tile-size", "28"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mm-llama bench: error: the resampled loader drew every one of its 3 shard(s)" in err
    assert "0 bytes: an empty file" in err and "git-lfs pointer" in err


def test_every_cut_point_is_accounted_for(tmp_path: Path) -> None:
    """Cut shard 0 at every 512-byte block (member boundaries, headers, data, the end marker) and append
    junk after its end: with stats.json, samples read + samples counted as lost is always 12."""
    src = tmp_path / "src"
    src.mkdir()
    shards = write_text_shards(src, 12, 6, stats=True)
    data = Path(shards[0]).read_bytes()
    variants = [data[:cut] for cut in range(0, len(data), 512)] + [data + b"junk" * 100]
    for i, variant in enumerate(variants):
        folder = tmp_path / f"v{i}"
        folder.mkdir()
        for f in src.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "shard-000000.tar").write_bytes(variant)
        recorder = StatsRecorder()
        keys = read([str(folder / "shard-000000.tar"), str(folder / "shard-000001.tar")], recorder)
        total = recorder.total
        assert len(set(keys)) == len(keys), i
        assert (len(keys) + total.lost, total.lost_unknown) == (12, 0), (i, keys, list(total.recent))
