"""Write a file so that readers see the old content or the new, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` through `path.tmp` + fsync + `os.replace`; returns the path.

    A crash leaves either the previous file or the complete new one (plus, at worst, a stale `.tmp`)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target
