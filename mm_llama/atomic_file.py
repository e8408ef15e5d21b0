"""Write a file so that readers see the old content or the new, never a torn one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write"]


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path (`path.tmp`) to write the new file to; when the block ends without an error it
    is fsynced and moved over `path` (`os.replace`), after an error it is removed. For writers that take
    a file name (`safetensors.torch.save_file` of a multi-GB shard) rather than bytes in memory."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` through `path.tmp` + fsync + `os.replace`; returns the path.

    A crash leaves either the previous file or the complete new one (plus, at worst, a stale `.tmp`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
