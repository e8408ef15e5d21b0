"""Damaged local tar shards: what a streaming reader would silently miss, and how many samples a shard
should hold.

* :func:`inspect_tar_file` walks a ``.tar``'s headers (seeking over member data) and reports members that
  Python's ``tarfile`` (and so webdataset) would drop without raising: after a corrupt header, after a
  premature end-of-archive marker, or after a cut at a member boundary (no end marker). Bytes after a
  proper end marker that hold no member are only noted as trailing data: they lose nothing.
* :func:`expected_samples_of` reads a shard's sample count from the ``stats.json`` that ``mm-llama
  shards`` writes beside its shards, so that a damaged shard can say how many samples it lost.
* :func:`file_hint` names the plain reasons a file holds no tar at all (0 bytes, a git-lfs pointer).

All take local paths; :mod:`mm_llama.data.shard_source` maps shard URLs to paths.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache

from webdataset.tariterators import base_plus_ext

from mm_llama.data.json_limits import JSONLimitError, loads_limited

__all__ = ["LFS_POINTER", "TarCheck", "expected_samples_of", "file_hint", "inspect_tar_file"]


@dataclass(frozen=True)
class TarCheck:
    """What :func:`inspect_tar_file` found in a local ``.tar``.

    problem: why members would be lost (a corrupt header, a missing end-of-archive marker), or None.
    readable: samples (distinct keys) before the point where reading stops.
    trailing: a note about harmless bytes after the end-of-archive marker, or None.
    """

    problem: str | None = None
    readable: int = 0
    trailing: str | None = None


_INTACT = TarCheck()


def inspect_tar_file(path: str) -> TarCheck:
    """Walk a local uncompressed ``.tar``'s headers (seeking over member data) and say what a reader
    would miss.

    Python's ``tarfile`` (and so webdataset) stops without raising at the first unreadable header after
    the first one, and at the end of the file when the archive lacks its end-of-archive marker (zero
    blocks), which would drop the rest of a shard silently. ``problem`` is set when

    * reading stops at a block that is not a zero block while non-zero bytes follow (a corrupt header);
    * reading stops at zero blocks but a valid tar header follows them (members after a premature end);
    * the file ends right after a member, with no end-of-archive marker (cut at a member boundary).

    Bytes after a proper end marker that hold no tar header (zero padding, trailing garbage) lose no
    member: ``trailing`` notes them. Intact archives, compressed shards, and archives whose
    reading raises (the streaming reader then raises too, and that error is counted instead) give an
    empty check. Results are cached per (path, size, modification time, inode).
    """
    if not path.endswith(".tar"):
        return _INTACT
    try:
        st = os.stat(path)
    except OSError:
        return _INTACT
    return _inspect_tar(path, st.st_size, st.st_mtime_ns, st.st_ino)


def _is_header(block: bytes) -> bool:
    if len(block) < tarfile.BLOCKSIZE or not block.strip(b"\0"):
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return True


@lru_cache(maxsize=4096)
def _inspect_tar(path: str, size: int, mtime_ns: int, inode: int) -> TarCheck:
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if info.isreg():
                    key, _ = base_plus_ext(info.name)
                    if key is not None:
                        keys.add(key)
            end = tf.offset
            members = len(tf.members)
        with open(path, "rb") as f:
            f.seek(min(end, size))
            tail = f.read(min(max(size - end, 0), 1 << 20))
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return _INTACT
    readable = len(keys)
    if end >= size:
        if members and end == size:
            return TarCheck(
                f"the tar ends at byte {size} right after a member, without its end-of-archive marker: the "
                "file was cut at a member boundary and any members after that point are lost (re-write or "
                "re-download the shard)", readable)
        return TarCheck(readable=readable)
    block = tail[: tarfile.BLOCKSIZE]
    if block.strip(b"\0") or len(block) < tarfile.BLOCKSIZE:
        if not tail.strip(b"\0"):
            return TarCheck(readable=readable)  # a short run of zeros: an end marker cut short, nothing lost
        return TarCheck(
            f"corrupt tar header at byte {end} of {size}: reading stops there and the members after it are "
            "lost (re-write or re-download the shard)", readable)
    # A zero block: the end-of-archive marker. Members after it would be lost; anything else is harmless.
    for at in range(tarfile.BLOCKSIZE, len(tail) - tarfile.BLOCKSIZE + 1, tarfile.BLOCKSIZE):
        if _is_header(tail[at:at + tarfile.BLOCKSIZE]):
            return TarCheck(
                f"the tar has an end-of-archive marker at byte {end} of {size} but a member header follows at "
                f"byte {end + at}: reading stops at the marker and the members after it are lost (re-write "
                "the shard; `tar --ignore-zeros` can recover them)", readable)
    if tail.strip(b"\0"):
        return TarCheck(readable=readable, trailing=(
            f"{size - end} byte(s) after the end-of-archive marker at byte {end} hold no tar member "
            "(trailing data, ignored; no sample is lost)"))
    return TarCheck(readable=readable)


_STATS_NAME = "stats.json"


def expected_samples_of(path: str) -> int | None:
    """How many samples the shard `url` holds, from the ``stats.json`` that ``mm-llama shards`` writes
    in the shards' folder (its ``shard_samples``; for older files, derived from ``samples``,
    ``samples_per_shard`` and the ``shards`` list when no size limit was set). None when unknown."""
    stats = os.path.join(os.path.dirname(os.path.abspath(path)), _STATS_NAME)
    try:
        st = os.stat(stats)
    except OSError:
        return None
    counts = _shard_counts(stats, st.st_size, st.st_mtime_ns)
    return None if counts is None else counts.get(os.path.basename(path))


@lru_cache(maxsize=256)
def _shard_counts(stats: str, size: int, mtime_ns: int) -> dict[str, int] | None:
    if size > (16 << 20):
        return None
    try:
        with open(stats, "rb") as f:
            data = loads_limited(f.read())
    except (OSError, JSONLimitError):
        return None
    if not isinstance(data, dict):
        return None

    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    explicit = data.get("shard_samples")
    if isinstance(explicit, dict) and all(isinstance(k, str) and count(v) for k, v in explicit.items()):
        return dict(explicit)
    shards, total, per = data.get("shards"), data.get("samples"), data.get("samples_per_shard")
    if (not isinstance(shards, list) or not shards or not all(isinstance(n, str) for n in shards)
            or not count(total) or not count(per) or per < 1 or data.get("max_shard_bytes") is not None):
        return None
    last = total - per * (len(shards) - 1)
    if not 1 <= last <= per:
        return None  # stats.json does not describe fixed-size shards; do not guess
    return {name: (per if i < len(shards) - 1 else last) for i, name in enumerate(shards)}


LFS_POINTER = b"version https://git-lfs"


def file_hint(path: str) -> str | None:
    """What is plainly wrong with a local shard file that holds no tar (empty, a git-lfs pointer), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if size == 0:
        return "0 bytes: an empty file"
    if head.startswith(LFS_POINTER):
        return "a git-lfs pointer file, not the shard itself: run `git lfs pull` where the shards live"
    return None
