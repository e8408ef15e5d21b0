"""The run directory of `mm-llama train` (`--out`): created up front, so that a bad path is one clear error.

    prepare_run_dir(Path("runs/vision"))   # creates it (and its parents); ValueError if it cannot be used
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class RunDirError(ValueError):
    """`--out` names something that cannot hold a run (a file, or a place that cannot be written)."""


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create `run_dir` (with its parents) and check that files can be written in it; returns it.

    Raises `RunDirError` naming the path and what to do when it is an existing file, lies under a file,
    or cannot be created or written to."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {str(path)!r} is an existing file, not a directory; give a directory for the run "
                          "(it is created if missing), e.g. a new path under runs/")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RunDirError(f"--out {str(path)!r} cannot be created: {str(blocking)!r} is a file, not a directory; "
                          "choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a directory that exists may still refuse new files
            pass
    except OSError as err:
        why = err.strerror or type(err).__name__
        where = f" ({err.filename})" if err.filename and os.fspath(err.filename) != os.fspath(path) else ""
        raise RunDirError(f"--out {str(path)!r} cannot be used as a run directory: {why}{where}; choose a "
                          "writable directory with --out") from err
    return path


__all__ = ["RunDirError", "prepare_run_dir"]
