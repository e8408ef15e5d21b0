"""Sequential reading of evaluation shards: fixed order, every sample once, damaged samples skipped.

Evaluation must see the same samples in the same order on every run, so this reader has none of the
training pipeline's machinery (no shard shuffle, no resampling, no node/worker split, no sample
shuffle buffer). It reads ``.tar`` / ``.tar.gz`` shards in the order given — every spec the training
loader takes (:func:`~mm_llama.data.shard_source.expand_shards`: files, directories, globs, brace patterns,
``pipe:`` commands, remote URLs) — with webdataset's tar reader (as the training loader does) and groups consecutive members that share a key, as webdataset
does: the key of ``dir/KEY.ext`` is ``dir/KEY`` (split at the first dot of the base name) and the
extension is lower-cased (a repeated member is a skipped sample here, not an error for the whole shard).

Each sample is yielded as a dict::

    {"key": "test-00000000-q0",             # sample key inside the shard
     "shard": "/data/image-qa/test-000000.tar",
     "image": <PIL.Image.Image, RGB>,        # decoded with mm_llama.data.decoders.decode_image
     "image_name": "/data/image-qa/test-000000.tar:test-00000000-q0.png",
     "json": {...},                          # KEY.json as a dict ({} when the sample has none)
     "txt": "a red circle ..." | None}       # KEY.txt as text (None when the sample has none)

Nothing is ever raised for bad data. A sample without an image member, with an image that does not
decode, with a ``KEY.json`` that is not a JSON object or a ``KEY.txt`` that is not UTF-8 is skipped:
a :class:`CorruptSampleWarning` naming the shard and key is issued and a :class:`SkippedSample` is
appended to :attr:`EvalShardReader.skipped`. A shard that cannot be opened, is truncated, or whose
tar headers stop before the end of its data (a streaming tar reader silently ends an archive at a
corrupt header that is not the first one; local ``.tar`` files are checked for that with
:func:`~mm_llama.data.tar_check.inspect_tar_file`, as the training loader checks them) is recorded
with ``key=None``; the samples read from it before the damage are kept.
"""

from __future__ import annotations

import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from webdataset.tariterators import tar_file_expander, url_opener

from mm_llama.data.decoders import DecodeError, decode_audio, decode_image, decode_video
from mm_llama.data.sample_processors import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS
from mm_llama.data.json_limits import JSONLimitError, loads_limited
from mm_llama.data.shard_source import expand_shards, inspect_tar, is_remote
from mm_llama.encoders.audio_features import SAMPLE_RATE

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptSampleWarning",
    "EvalShardReader",
    "SkippedSample",
    "expand_eval_shards",
    "split_member_name",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""Image members looked for in a sample, in this order (the first one present is used)."""



class CorruptSampleWarning(UserWarning):
    """A sample or shard could not be read and was skipped (the message names shard and key)."""


@dataclass(frozen=True)
class SkippedSample:
    """One thing the reader (or the eval loop) skipped.

    shard: the shard path. key: the sample key, or None when the shard itself is damaged (then an
    unknown number of samples after the damage is lost). reason: what was wrong.
    """

    shard: str
    key: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.shard}:{self.key}" if self.key is not None else self.shard
        return f"{where}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# shard lists


def expand_eval_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The shard URLs named by ``shards``, in the order given: exactly what training's
    :func:`~mm_llama.data.shard_source.expand_shards` gives (``.tar`` files, directories, globs, brace
    patterns such as ``dir/shard-{000000..000009}.tar``, ``pipe:`` commands, ``http(s)://`` / ``s3://`` ...
    URLs, or a list of these). Local shards are checked to exist; remote ones are read as given (their
    contents must not change between runs for results to be comparable)."""
    return expand_shards(shards)


# --------------------------------------------------------------------------------------------------
# tar members → samples


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.ext.more"`` → ``("dir/KEY", "ext.more")`` (extension lower-cased), as webdataset
    splits member names; None for names whose base name has no dot or starts with one (ignored)."""
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class _ShardDamaged(Exception):
    """Reading a shard stopped early; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read_error(e: BaseException) -> str:
    """``Type: message`` of a read error, without the stream object webdataset adds to its arguments."""
    text = e.args[0] if len(e.args) > 1 and isinstance(e.args[0], str) else str(e)
    return f"{type(e).__name__}: {text}"


def _members(url: str) -> Iterator[tuple[str, str, bytes]]:
    """``(key, ext, data)`` of each file member of a shard (a local path or any URL webdataset opens:
    ``pipe:CMD``, ``http(s)://`` ...), in order, read with webdataset's tar reader (as the training loader
    reads shards); raises `_ShardDamaged` where reading stops: a read error, or, for a local ``.tar``, the
    damage `inspect_tar` finds that the streaming reader would pass over silently."""
    try:
        for member in tar_file_expander(url_opener([{"url": url}]), eof_value=None):
            parts = split_member_name(member["fname"])
            if parts is not None:
                yield parts[0], parts[1], member["data"]
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise _ShardDamaged(f"the shard is truncated or corrupt ({_read_error(e)}); the samples after "
                            "this point are lost") from None
    damage = inspect_tar(url).problem
    if damage is not None:
        raise _ShardDamaged(damage)


class EvalShardReader:
    """Iterate the samples of evaluation shards in a fixed order (see the module docstring).

    Args:
        shards: what :func:`expand_eval_shards` accepts.
        warn: issue a :class:`CorruptSampleWarning` for each skipped sample / damaged shard.
        media: ``image`` (samples carry a decoded RGB ``image``), ``audio`` (a 16 kHz mono waveform
            ``audio [S]``, from any audio member soundfile reads; stereo mixed down) or ``video``
            (``video [K, 3, H, W]`` uint8: ``num_frames`` frames spread uniformly over the clip).

    Attributes:
        urls: the shard paths, in reading order.
        skipped: every :class:`SkippedSample` so far (cleared at the start of each iteration).
        samples_read: samples yielded in the current iteration.
        samples_skipped: entries of ``skipped`` that are samples (not damaged shards).
    """

    def __init__(self, shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, warn: bool = True,
                 media: str = "image", num_frames: int = 16) -> None:
        if media not in ("image", "audio", "video"):
            raise ValueError(f"media must be 'image', 'audio' or 'video', got {media!r}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        self.media = media
        self.num_frames = num_frames
        self.urls = expand_eval_shards(shards)
        self.warn = warn
        self.skipped: list[SkippedSample] = []
        self.samples_read = 0
        self.samples_skipped = 0

    def __repr__(self) -> str:
        return f"EvalShardReader({len(self.urls)} shards)"

    def skip(self, shard: str, key: str | None, reason: str) -> None:
        """Record (and warn about) a skipped sample; also used by the eval loop for task-level problems."""
        item = SkippedSample(shard, key, reason)
        self.skipped.append(item)
        self.samples_skipped += key is not None
        if self.warn:
            what = f"sample {key!r} of shard {shard}" if key is not None else f"shard {shard}"
            warnings.warn(f"skipped {what}: {reason}", CorruptSampleWarning, stacklevel=3)

    def count_samples(self) -> int | None:
        """Number of sample keys in the shards; None when a shard is damaged (the iteration reports why).
        For progress bars: a local ``.tar`` is counted from its headers (`inspect_tar`, cached for the
        damage check of the real pass), other local shards by reading their members without decoding them;
        None as soon as a shard is remote (``pipe:``, ``http(s)://`` ...: counting would read it twice)."""
        if any(is_remote(url) for url in self.urls):
            return None
        total = 0
        for url in self.urls:
            check = inspect_tar(url)
            if check.problem is not None:
                return None
            if url.endswith(".tar") and check.readable:
                total += check.readable
                continue
            last = None
            try:
                for key, _, _ in _members(url):
                    total += key != last
                    last = key
            except _ShardDamaged:
                return None
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = []
        self.samples_read = 0
        self.samples_skipped = 0
        for url in self.urls:
            yield from self._shard(url)

    def _shard(self, url: str) -> Iterator[dict[str, Any]]:
        key: str | None = None
        group: dict[str, bytes] = {}
        repeated: list[str] = []
        try:
            for member_key, ext, data in _members(url):
                if member_key != key:
                    if key is not None:
                        sample = self._sample(url, key, group, repeated)
                        if sample is not None:
                            yield sample
                    key, group, repeated = member_key, {}, []
                if ext in group:
                    repeated.append(ext)
                group[ext] = data
        except _ShardDamaged as e:
            self.skip(url, None, e.reason)
            if key is not None:  # the members of the current sample read before the damage are complete
                sample = self._sample(url, key, group, repeated)
                if sample is not None:
                    yield sample
            return
        if key is not None:
            sample = self._sample(url, key, group, repeated)
            if sample is not None:
                yield sample

    def _sample(self, url: str, key: str, group: dict[str, bytes], repeated: list[str]) -> dict[str, Any] | None:
        if repeated:
            self.skip(url, key, f"member(s) {', '.join(f'{key}.{e}' for e in repeated)} occur more than once")
            return None
        extensions = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "video": VIDEO_EXTENSIONS}[self.media]
        ext = next((e for e in extensions if e in group), None)
        if ext is None:
            self.skip(url, key, f"no {self.media} member (expected KEY.{{{','.join(extensions)}}}); "
                                f"the sample has {sorted(group)}")
            return None
        meta: Any = {}
        if "json" in group:
            try:
                meta = loads_limited(group["json"])  # the training loader's limits: depth, surrogates, huge ints
            except JSONLimitError as e:
                self.skip(url, key, f"KEY.json cannot be used: {e}")
                return None
            if not isinstance(meta, dict):
                self.skip(url, key, f"KEY.json must hold a JSON object, got {type(meta).__name__}")
                return None
        text: str | None = None
        if "txt" in group:
            try:
                text = group["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                self.skip(url, key, f"KEY.txt is not UTF-8 text ({e})")
                return None
        name = f"{url}:{key}.{ext}"
        try:
            decoded: Image.Image | Any = self._decode(group[ext], name)
        except DecodeError as e:
            self.skip(url, key, e.reason)
            return None
        self.samples_read += 1
        return {"key": key, "shard": url, self.media: decoded, f"{self.media}_name": name, "json": meta, "txt": text}

    def _decode(self, data: bytes, name: str) -> Any:
        if self.media == "image":
            return decode_image(data, name)
        if self.media == "audio":
            return decode_audio(data, name, SAMPLE_RATE)
        return decode_video(data, name, self.num_frames)
