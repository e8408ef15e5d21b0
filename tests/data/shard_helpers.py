"""Tiny text-only shards and tar inspection shared by the shard tests."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import webdataset as wds

from mm_llama.data.shard_source import ShardSource, tar_samples
from mm_llama.data.shard_writer import ShardWriter


def write_text_shards(out: Path, n_samples: int, per_shard: int, prefix: str = "shard", *,
                      stats: bool = False) -> list[str]:
    """Shards of `n_samples` text-only samples (`KEY.txt` + `KEY.json`), keys `s0000`, `s0001`, ...; with
    `stats`, also the stats.json `mm-llama shards` writes (with `shard_samples`)."""
    with ShardWriter(out, prefix=prefix, samples_per_shard=per_shard) as w:
        for i in range(n_samples):
            w.write(f"s{i:04d}", {"txt": f"sample {i}", "json": f'{{"i": {i}}}'})
    if stats:
        (out / "stats.json").write_text(json.dumps({
            "samples": n_samples, "shards": [p.name for p in w.shards], "samples_per_shard": per_shard,
            "max_shard_bytes": None, "shard_samples": {p.name: n for p, n in zip(w.shards, w.shard_samples)},
        }))
    return [str(p) for p in w.shards]


def read_keys(source: ShardSource) -> list[str]:
    return [s["__key__"] for s in wds.DataPipeline(*tar_samples(source))]


def member_offsets(path: str) -> list[int]:
    """Byte offset of each member's header, in tar order."""
    with tarfile.open(path) as tf:
        return [m.offset for m in tf.getmembers()]
