"""ShardWriter: tar members, shard boundaries by count and bytes, atomic rename, byte-identical output."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from mm_llama.data.shard_writer import ShardWriter, validate_extension, validate_key


def sample(i: int, size: int = 10) -> dict[str, bytes]:
    return {"bin": bytes([i % 256]) * size, "txt": f"caption {i}".encode(), "json": json.dumps({"i": i}).encode()}


def write_all(out: Path, n: int, **kw: object) -> ShardWriter:
    with ShardWriter(out, **kw) as w:  # type: ignore[arg-type]
        for i in range(n):
            w.write(f"k{i:04d}", sample(i))
    return w


def shard_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_members_and_webdataset_read_back(tmp_path: Path) -> None:
    w = write_all(tmp_path, 5)
    assert shard_names(tmp_path) == ["shard-000000.tar"]
    assert w.shards == [tmp_path / "shard-000000.tar"] and w.samples == 5
    with tarfile.open(w.shards[0]) as tar:
        assert tar.getnames()[:3] == ["k0000.bin", "k0000.json", "k0000.txt"]
        assert len(tar.getmembers()) == 15
    ds = wds.WebDataset([str(p) for p in w.shards], shardshuffle=False)
    got = list(ds)
    assert [s["__key__"] for s in got] == [f"k{i:04d}" for i in range(5)]
    for i, s in enumerate(got):
        assert s["bin"] == sample(i)["bin"] and s["txt"] == f"caption {i}".encode()
        assert json.loads(s["json"]) == {"i": i}


def test_shard_boundary_by_count(tmp_path: Path) -> None:
    w = write_all(tmp_path, 7, samples_per_shard=3, prefix="train")
    assert shard_names(tmp_path) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    counts = []
    for p in w.shards:
        with tarfile.open(p) as tar:
            counts.append(len(tar.getmembers()) // 3)
    assert counts == [3, 3, 1]
    assert w.bytes == sum(p.stat().st_size for p in w.shards)


def test_shard_boundary_by_bytes(tmp_path: Path) -> None:
    # each sample: 3 members x (512 header + 512 data) = 3072 bytes; + 1024 end marker, padded to 10240
    limit = 2 * 10240
    with ShardWriter(tmp_path, max_shard_bytes=limit, samples_per_shard=1000) as w:
        for i in range(12):
            w.write(f"k{i}", sample(i))
        w.write("big", {"bin": b"x" * 50_000})  # larger than the limit: a shard of its own
        w.write("after", sample(99))
    sizes = [p.stat().st_size for p in w.shards]
    counts = []
    for p in w.shards:
        with tarfile.open(p) as tar:
            counts.append(len({m.name.split(".")[0] for m in tar.getmembers()}))
    # 6 samples fill 18432 + 1024 → 20480 ≤ limit; a 7th would need 30720
    assert counts == [6, 6, 1, 1]
    assert sizes[0] <= limit and sizes[1] <= limit and sizes[2] > limit and sizes[3] <= limit
    assert all(s % 10240 == 0 for s in sizes)
    assert w.bytes == sum(sizes)


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = write_all(tmp_path / "a", 9, samples_per_shard=4)
    b = write_all(tmp_path / "b", 9, samples_per_shard=4)
    assert [p.name for p in a.shards] == [p.name for p in b.shards]
    for pa, pb in zip(a.shards, b.shards, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    with tarfile.open(a.shards[0]) as tar:
        m = tar.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o444)


def test_tmp_until_complete_and_none_left(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, samples_per_shard=2)
    w.write("a", sample(0))
    assert shard_names(tmp_path) == ["shard-000000.tar.tmp"]  # no visible .tar while it is open
    w.write("b", sample(1))
    w.write("c", sample(2))  # first shard complete → renamed
    assert shard_names(tmp_path) == ["shard-000000.tar", "shard-000001.tar.tmp"]
    w.close()
    w.close()  # idempotent
    assert shard_names(tmp_path) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ValueError, match="closed"):
        w.write("d", sample(3))


def test_exception_drops_unfinished_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, samples_per_shard=2) as w:
            for i in range(3):
                w.write(f"k{i}", sample(i))
            raise RuntimeError("boom")
    assert shard_names(tmp_path) == ["shard-000000.tar"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert len(tar.getmembers()) == 6


def test_no_samples_no_shards(tmp_path: Path) -> None:
    w = write_all(tmp_path / "out", 0)
    assert w.shards == [] and w.samples == 0 and w.bytes == 0 and shard_names(tmp_path / "out") == []


@pytest.mark.parametrize("key", ["", "a.b", "a/b", "with space", "ü", "..", 7])
def test_bad_keys(tmp_path: Path, key: object) -> None:
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="sample key"):
            w.write(key, sample(0))  # type: ignore[arg-type]
        w.write("ok", sample(0))  # the writer goes on after a rejected sample
    assert w.samples == 1


def test_duplicate_key_and_bad_files(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        w.write("a", sample(0))
        with pytest.raises(ValueError, match="already written"):
            w.write("a", sample(1))
        for ext in ["", "JPG", ".jpg", "_meta", "a b", "jpg."]:
            with pytest.raises(ValueError, match="extension"):
                w.write("b", {ext: b"x"})
        with pytest.raises(ValueError, match="non-empty dict"):
            w.write("b", {})
        with pytest.raises(TypeError, match="json.dumps"):
            w.write("b", {"json": {"a": 1}})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="longer than 100"):
            w.write("k" * 97, {"json": b"{}"})
        w.write("b", {"txt": "unicode ✓", "seg.png": bytearray(b"\x89PNG")})
    ds = list(wds.WebDataset([str(w.shards[0])], shardshuffle=False))
    assert [s["__key__"] for s in ds] == ["a", "b"]
    assert ds[1]["txt"] == "unicode ✓".encode() and ds[1]["seg.png"] == b"\x89PNG"


def test_validators() -> None:
    assert validate_key("abc-123_X") == "abc-123_X"
    assert validate_extension("seg.png") == "seg.png"
    with pytest.raises(ValueError, match="no dots"):
        validate_key("a.b")


def test_existing_shards_refused_unless_overwrite(tmp_path: Path) -> None:
    write_all(tmp_path, 5, samples_per_shard=2)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds 3 shard"):
        ShardWriter(tmp_path)
    ShardWriter(tmp_path, prefix="other").close()  # another prefix is fine
    w = write_all(tmp_path, 1, overwrite=True)
    assert shard_names(tmp_path) == ["notes.txt", "shard-000000.tar"] and w.samples == 1


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardWriter(tmp_path, samples_per_shard=0)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        ShardWriter(tmp_path, max_shard_bytes=0)
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(tmp_path, prefix="a/b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ShardWriter(tmp_path / "file")
