"""Shard lists, epoch / resampled orders, node × worker splits and damaged tars (no media decoding)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mm_llama.data import shard_source
from mm_llama.data.loader_stats import LoaderStats, StatsRecorder, TooManySkippedError
from mm_llama.data.shard_source import (
    ShardSource,
    check_tar_end,
    expand_shards,
    mix_seed,
    node_info,
    samples_per_worker,
    split_by_node,
    split_by_worker,
)
from tests.data.shard_helpers import member_offsets, read_keys, write_text_shards


# --------------------------------------------------------------------------------------------------
# expansion


def test_expand_brace_directory_glob_and_list(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 10, 2)
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")  # img2dataset side files are ignored
    (tmp_path / "00000_stats.json").write_text("{}")
    pattern = str(tmp_path / "shard-{000000..000004}.tar")
    assert expand_shards(pattern) == shards
    assert expand_shards(tmp_path) == shards
    assert expand_shards(str(tmp_path / "shard-*.tar")) == shards
    assert expand_shards([shards[3], Path(shards[0])]) == [shards[3], shards[0]]
    assert expand_shards(shards[1]) == [shards[1]]
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]


def test_expand_errors_name_the_pattern(tmp_path: Path) -> None:
    write_text_shards(tmp_path, 4, 2)
    with pytest.raises(ValueError, match=r"no shards match .*nothing-\*\.tar"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match=r"no shards match .*missing\.tar.*does not exist"):
        expand_shards(str(tmp_path / "missing.tar"))
    with pytest.raises(ValueError, match=r"3 of the 5 shards named by .*shard-\{000000\.\.000004\}"):
        expand_shards(str(tmp_path / "shard-{000000..000004}.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no"):
        expand_shards(empty)
    with pytest.raises(ValueError, match="empty"):
        expand_shards([])
    with pytest.raises(ValueError, match="must be a path"):
        expand_shards(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# ranks and workers


def test_node_info_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert node_info() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert node_info() == (2, 4)
    assert node_info(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="rank < world_size"):
        node_info(2, 2)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="not integers"):
        node_info()


def test_split_functions_and_shares() -> None:
    items = list(range(10))
    assert list(split_by_node(items, 1, 3)) == [1, 4, 7]
    assert list(split_by_worker(items, 0, 4)) == [0, 4, 8]
    assert list(split_by_worker(items)) == items  # main process: one worker
    with pytest.raises(ValueError, match="worker_id"):
        list(split_by_worker(items, 2, 2))
    assert [samples_per_worker(10, w, 3) for w in range(3)] == [4, 3, 3]
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3) != mix_seed(1, 2, 4)


def test_two_nodes_two_workers_cover_each_epoch_exactly_once(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 22, 2)  # 11 shards: uneven on purpose
    orders = []
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in range(2):
            source = ShardSource(shards, rank=rank, world_size=2, seed=5, epoch=epoch)
            for worker in range(2):
                seen += source.shards_for(worker, 2)
        assert sorted(seen) == sorted(shards)  # disjoint and complete
        orders.append(ShardSource(shards, rank=0, world_size=1, seed=5, epoch=epoch).epoch_order())
    assert orders[0] != orders[1]  # a new shuffle each epoch
    assert ShardSource(shards, rank=0, world_size=1, seed=5, epoch=0).epoch_order() == orders[0]
    unshuffled = ShardSource(shards, rank=0, world_size=1, shuffle=False)
    assert unshuffled.epoch_order() == shards


def test_node_worker_split_drives_the_sample_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_text_shards(tmp_path, 16, 2)
    keys: list[str] = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setattr(shard_source, "worker_info", lambda w=worker: (w, 2))
            keys += read_keys(ShardSource(shards, rank=rank, world_size=2, seed=1))
    assert sorted(keys) == [f"s{i:04d}" for i in range(16)]


def test_resampled_is_reproducible_per_seed_epoch_and_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_text_shards(tmp_path, 20, 2)

    def first(n: int, **kw: int) -> list[str]:
        source = ShardSource(shards, resampled=True, rank=0, world_size=1, **kw)
        out = []
        for d in source:
            out.append(d["url"])
            if len(out) == n:
                return out
        raise AssertionError("resampled source ended")

    a = first(30, seed=3, epoch=0)
    assert a == first(30, seed=3, epoch=0)
    assert a != first(30, seed=3, epoch=1)
    assert a != first(30, seed=4, epoch=0)
    assert len(set(a)) > 1
    monkeypatch.setattr(shard_source, "worker_info", lambda: (1, 2))
    assert a != first(30, seed=3, epoch=0)


# --------------------------------------------------------------------------------------------------
# damaged archives


def test_intact_tar_passes_the_end_check(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 4, 4)
    assert check_tar_end(shards[0]) is None
    assert check_tar_end("pipe:cat x.tar") is None


def test_corrupt_header_is_counted_not_silent(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 6, 6)
    offsets = member_offsets(shards[0])  # 12 members: s0000.json, s0000.txt, s0001.json, ...
    data = bytearray(Path(shards[0]).read_bytes())
    data[offsets[6] + 10] ^= 0xFF  # the header of s0003.json
    Path(shards[0]).write_bytes(bytes(data))
    assert "corrupt tar header" in (check_tar_end(shards[0]) or "")
    recorder = StatsRecorder()
    keys = read_keys(ShardSource(shards, rank=0, world_size=1, shuffle=False, recorder=recorder))
    assert keys == ["s0000", "s0001", "s0002"]
    assert recorder.total.skipped["tar"] == 1
    assert recorder.total.recent[-1].source == f"{shards[0]}:<archive>"


def test_truncated_tar_is_skipped_and_counted_once(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 8, 4)
    offsets = member_offsets(shards[0])
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[: offsets[5] + 512 + 3])  # inside the data of s0002.txt
    recorder = StatsRecorder()
    keys = read_keys(ShardSource(shards, rank=0, world_size=1, shuffle=False, recorder=recorder))
    assert keys[:2] == ["s0000", "s0001"]
    assert keys[-4:] == ["s0004", "s0005", "s0006", "s0007"]  # the next shard is read normally
    assert recorder.total.skipped["tar"] == 1
    assert recorder.total.shards == 2


def test_garbage_file_is_counted(tmp_path: Path) -> None:
    shards = write_text_shards(tmp_path, 4, 2)
    Path(shards[0]).write_bytes(bytes(range(1, 256)) * 12)  # not a tar, not compressed
    recorder = StatsRecorder()
    keys = read_keys(ShardSource(shards, rank=0, world_size=1, shuffle=False, recorder=recorder))
    assert keys == ["s0002", "s0003"]
    assert recorder.total.skipped["tar"] == 1


def test_resampled_source_of_empty_shards_stops(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:  # a valid archive without members
        info = tarfile.TarInfo("__meta__")
        info.size = 0
        tf.addfile(info, io.BytesIO(b""))
    source = ShardSource([str(empty)], resampled=True, rank=0, world_size=1, stall_limit=20)
    with pytest.raises(ValueError, match="without finding a single sample"):
        read_keys(source)


# --------------------------------------------------------------------------------------------------
# statistics


def test_stats_merge_check_and_message() -> None:
    worker = StatsRecorder()
    for i in range(3):
        worker.sample(100)
    for i in range(7):
        worker.skip("decode_image", f"shard-000001.tar:{i:09d}", "cannot decode it", log=False)
    worker.skip("empty_labels", "shard-000002.tar:000000042", "no response", log=False)
    worker.time("decode", 0.5)
    total = LoaderStats().merge(worker.take_delta())
    assert worker.take_delta().seen == 0  # the delta was reset
    assert (total.samples, total.skipped_total, total.bytes) == (3, 8, 300)
    total.check(0.9, min_samples=5)  # 8/11 < 0.9
    total.check(0.1, min_samples=100)  # too few samples met to judge
    with pytest.raises(TooManySkippedError) as err:
        total.check(0.1, min_samples=5)
    message = str(err.value)
    assert "skipped 8 of 11 samples" in message
    assert "decode_image (7)" in message and "empty_labels (1)" in message
    assert "shard-000002.tar:000000042" in message
    assert "max_skip_fraction=0.1" in message and "LoaderConfig(max_skip_fraction=" in message
    nothing_usable = LoaderStats()
    nothing_usable.skipped["decode_image"] = 5
    with pytest.raises(TooManySkippedError, match="not one sample"):
        nothing_usable.check(1.0, min_samples=5)
    assert TooManySkippedError("x").args == ("x",)  # constructible from one message (worker re-raise)
