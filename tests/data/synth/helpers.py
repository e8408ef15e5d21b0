"""Helpers shared by the synthetic-data tests (tar reading, PNG decoding)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def read_shards(folder: Path, split: str) -> dict[str, dict[str, bytes]]:
    """All samples of ``folder/{split}-*.tar`` as ``{key: {ext: bytes}}`` (in shard order)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                assert f is not None
                samples.setdefault(key, {})[ext] = f.read()
    return samples


def load_json(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def png_pixels(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
