"""Write samples into webdataset tar shards, atomically and reproducibly.

`ShardWriter` turns `write(key, {"jpg": b"...", "txt": b"...", "json": b"..."})` calls into tar members
`KEY.jpg`, `KEY.txt`, `KEY.json` in `OUT_DIR/PREFIX-000000.tar`, `PREFIX-000001.tar`, ... and starts a
new shard when the next sample would exceed `samples_per_shard` samples or `max_shard_bytes` bytes.

- **Atomic**: a shard is written to `PREFIX-NNNNNN.tar.tmp` and renamed to `PREFIX-NNNNNN.tar` only
  once it is complete and synced, so readers (and a rerun after a crash) never see a half-written
  `.tar`. If the `with` block raises, the unfinished `.tmp` is deleted; finished shards stay.
- **Overwrite only on success**: with `overwrite=True` and shards of an earlier run in `OUT_DIR`, the
  new shards are written into a hidden staging folder inside `OUT_DIR` (`.shards-new-XXXX/`, the same
  file system) and moved over the old ones only when `close()` succeeds; the old shards that the new
  run does not replace are deleted then. If the run fails (the `with` block raises), the staging folder
  is deleted and the earlier shards are left exactly as they were. (A run killed outright can leave a
  `.shards-new-XXXX/` folder; readers ignore it and the next successful overwrite removes it.)
- **Reproducible**: tar headers carry fixed mtime (0), uid/gid (0), user/group names and mode (0o444),
  and members of a sample are written in sorted extension order (webdataset's `TarWriter`), so the same
  samples in the same order always give byte-identical shards.
- **Sizes**: a shard's size is 512 bytes of header per member plus its data rounded up to 512, then
  1024 bytes of end marker, rounded up to the 10240-byte tar record. `max_shard_bytes` bounds that
  final file size; a single sample larger than the limit gets a shard of its own (the only case in which
  a shard exceeds the limit).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from webdataset import TarWriter

__all__ = ["ShardWriter", "validate_extension", "validate_key"]

BLOCK = 512  # tar block
RECORD = 20 * BLOCK  # tarfile pads the archive to a multiple of this
END_OF_ARCHIVE = 2 * BLOCK
MAX_MEMBER_NAME = 100  # ustar name field; keys contain no "/", so the prefix field cannot help

_STAGING_PREFIX = ".shards-new-"  # hidden folder in OUT_DIR holding an overwriting run's new shards
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_EXT_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def validate_key(key: object) -> str:
    """Check a sample key: a non-empty string of ASCII letters, digits, `_` and `-` (no dots, no slashes).

    webdataset splits a member name at the first dot of its base name into key and extension, and a
    slash would make a directory, so both are forbidden. Raises `ValueError` naming the key.
    """
    if not isinstance(key, str):
        raise ValueError(f"sample key must be a string, got {type(key).__name__} {key!r}")
    if not key:
        raise ValueError("sample key is empty; give every sample a non-empty key")
    if not _KEY_RE.match(key):
        raise ValueError(
            f"sample key {key!r} may only contain ASCII letters, digits, '_' and '-' "
            "(no dots, slashes, spaces or other characters: webdataset splits member names at the first dot)"
        )
    return key


def validate_extension(ext: object) -> str:
    """Check a member extension such as `jpg`, `json`, `seg.png`: lowercase ASCII letters and digits,
    dot/underscore/dash only between them (no leading dot or underscore: TarWriter drops `_` members).
    Raises `ValueError` naming the extension."""
    if not isinstance(ext, str) or not _EXT_RE.match(ext):
        raise ValueError(
            f"member extension {ext!r} is invalid: use lowercase ASCII letters and digits such as 'jpg', "
            "'txt', 'json' or 'seg.png' (no leading dot, no leading underscore, no uppercase)"
        )
    return ext


def _padded(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _member_bytes(size: int) -> int:
    return BLOCK + _padded(size, BLOCK)


class ShardWriter:
    """Write samples to `OUT_DIR/PREFIX-NNNNNN.tar` shards; use as a context manager (or call `close`).

    Args:
        out_dir: folder for the shards (created if missing).
        prefix: shard name prefix (ASCII letters, digits, `_`, `-`).
        samples_per_shard: at most this many samples per shard.
        max_shard_bytes: if set, at most this many bytes per shard file (see module docstring).
        overwrite: if False (default) the writer refuses to start when `out_dir` already holds
            `PREFIX-NNNNNN.tar` or `.tar.tmp` files from an earlier run (stale shards would mix with new
            ones); if True the new shards replace them when `close()` succeeds (see the module
            docstring: a failed run leaves them intact).

    Attributes (read-only properties): `shards` (paths of completed shards, in order; inside the staging
    folder until an overwriting writer is closed), `shard_samples` (samples per completed shard),
    `samples` (samples written), `bytes` (bytes of the completed shards plus the open shard's members
    so far).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} may only contain ASCII letters, digits, '_' and '-', and not be empty")
        if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
        if max_shard_bytes is not None and (
            isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1
        ):
            raise ValueError(f"max_shard_bytes must be a positive integer or None, got {max_shard_bytes!r}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"output path {str(self.out_dir)!r} exists and is not a directory; choose a folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes

        stale = self.existing_shards()
        if stale and not overwrite:
            raise ValueError(
                f"{str(self.out_dir)!r} already holds {len(stale)} shard file(s) named {prefix}-NNNNNN.tar "
                f"(e.g. {stale[0].name}) from an earlier run; choose an empty folder, another prefix, "
                "or overwrite them (overwrite=True, `--overwrite` on the command line)"
            )
        # Replacing an earlier run: write beside it, swap in close() (module docstring).
        self._staging: Path | None = (
            Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.out_dir)) if stale else None
        )

        self._shards: list[Path] = []
        self._shard_counts: list[int] = []
        self._keys: set[str] = set()
        self._samples = 0
        self._done_bytes = 0
        self._file: BinaryIO | None = None
        self._tar: TarWriter | None = None
        self._tmp: Path | None = None
        self._shard_samples = 0
        self._shard_bytes = 0  # members written to the open shard, headers included
        self._closed = False

    # -- properties -----------------------------------------------------------------------------

    @property
    def shards(self) -> list[Path]:
        """Completed shards (renamed to `.tar`), in write order."""
        return list(self._shards)

    @property
    def shard_samples(self) -> list[int]:
        """Samples in each completed shard, in the order of `shards`."""
        return list(self._shard_counts)

    @property
    def replacing(self) -> bool:
        """True while an overwriting writer stages new shards beside those of an earlier run."""
        return self._staging is not None

    def existing_shards(self) -> list[Path]:
        """`PREFIX-NNNNNN.tar` / `.tar.tmp` files in `out_dir` itself (the staging folder excluded)."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-\d{{6,}}\.tar(\.tmp)?$")
        return sorted(p for p in self.out_dir.iterdir() if pattern.match(p.name) and not p.is_dir())

    @property
    def samples(self) -> int:
        """Samples written so far (all shards, the open one included)."""
        return self._samples

    @property
    def bytes(self) -> int:
        """Bytes of the completed shard files plus the open shard's members so far."""
        return self._done_bytes + self._shard_bytes

    def _final_size(self, content_bytes: int) -> int:
        return _padded(content_bytes + END_OF_ARCHIVE, RECORD)

    # -- writing --------------------------------------------------------------------------------

    def _shard_path(self, index: int) -> Path:
        folder = self._staging if self._staging is not None else self.out_dir
        return folder / f"{self.prefix}-{index:06d}.tar"

    def _open_shard(self) -> None:
        final = self._shard_path(len(self._shards))
        self._tmp = final.with_name(final.name + ".tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish_shard / _abort
        self._tar = TarWriter(self._file, user="mm-llama", group="mm-llama", mode=0o444, mtime=0, encoder=False)
        self._shard_samples = 0
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        if self._tar is None or self._file is None or self._tmp is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self._shards.append(final)
        self._shard_counts.append(self._shard_samples)
        self._done_bytes += final.stat().st_size
        self._tar = self._file = self._tmp = None
        self._shard_samples = self._shard_bytes = 0

    def _abort(self) -> None:
        if self._tar is not None:
            # Close the tar stream too (its end blocks go into the file deleted below), so that it does
            # not try to flush into a closed file when garbage-collected; after a failed write it may fail.
            with contextlib.suppress(Exception):
                self._tar.close()
        if self._file is not None:
            try:
                self._file.close()
            finally:
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None
        self._shard_bytes = 0
        self._drop_staging()

    def _drop_staging(self) -> None:
        """A failed overwriting run: delete the new shards, keep the earlier run's."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            self._shards = []
            self._shard_counts = []

    def _swap(self) -> None:
        """A successful overwriting run: move the staged shards over the earlier run's, drop the rest."""
        if self._staging is None:
            return
        final: list[Path] = []
        for staged in self._shards:
            target = self.out_dir / staged.name
            os.replace(staged, target)
            final.append(target)
        keep = {p.name for p in final}
        for old in self.existing_shards():
            if old.name not in keep:
                old.unlink(missing_ok=True)
        shutil.rmtree(self._staging, ignore_errors=True)
        for leftover in self.out_dir.glob(f"{_STAGING_PREFIX}*"):  # of earlier runs that were killed
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        self._staging = None
        self._shards = final

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Write one sample: `files` maps extension → content; member `KEY.EXT` for each entry.

        Values are bytes-like (a `str` is stored UTF-8 encoded). Raises `ValueError` for an invalid or
        repeated key, an invalid extension, an empty `files` or a member name over 100 characters, and
        `TypeError` for a value that is not bytes or str; nothing is written for a rejected sample.
        """
        if self._closed:
            raise ValueError(f"ShardWriter for {str(self.out_dir)!r} is closed; create a new one to write more")
        validate_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written by this writer; keys must be unique")
        if not isinstance(files, dict) or not files:
            raise ValueError(f"sample {key!r}: files must be a non-empty dict of extension -> bytes, got {files!r:.80}")
        payload: dict[str, bytes] = {}
        for ext, value in files.items():
            validate_extension(ext)
            if len(key) + 1 + len(ext) > MAX_MEMBER_NAME:
                raise ValueError(
                    f"member name {key + '.' + ext!r} is longer than {MAX_MEMBER_NAME} characters (tar ustar "
                    "limit); use a shorter key"
                )
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif isinstance(value, (bytearray, memoryview)):
                value = bytes(value)
            elif not isinstance(value, bytes):
                raise TypeError(
                    f"sample {key!r} member {ext!r} is a {type(value).__name__}; pass bytes "
                    "(e.g. json.dumps(obj).encode() for metadata)"
                )
            payload[ext] = value
        sample_bytes = sum(_member_bytes(len(v)) for v in payload.values())

        if self._tar is not None:
            full = self._shard_samples >= self.samples_per_shard
            too_big = (
                self.max_shard_bytes is not None
                and self._final_size(self._shard_bytes + sample_bytes) > self.max_shard_bytes
            )
            if full or too_big:
                self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        try:
            self._tar.write({"__key__": key, **payload})
        except BaseException:
            # The open shard may now end in a partial member (disk full, interrupt): drop it and stop.
            self._abort()
            self._closed = True
            raise
        self._keys.add(key)
        self._samples += 1
        self._shard_samples += 1
        self._shard_bytes += sample_bytes

    def close(self) -> None:
        """Finish the open shard (rename `.tmp` → `.tar`). Idempotent."""
        if self._closed:
            return
        try:
            self._finish_shard()
            self._swap()
        except BaseException:
            self._abort()
            raise
        finally:
            self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()
            self._closed = True

    def __repr__(self) -> str:
        return (
            f"ShardWriter({str(self.out_dir)!r}, prefix={self.prefix!r}, samples_per_shard={self.samples_per_shard}, "
            f"max_shard_bytes={self.max_shard_bytes}, shards={len(self._shards)}, samples={self._samples})"
        )
