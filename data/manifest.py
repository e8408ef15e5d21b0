"""Write webdataset shards from a JSONL manifest of local media files and texts (`mm-llama shards`).

Shard layouts
-------------

Every sample is a group of tar members that share a key (`KEY.EXT`); `KEY.json` is one UTF-8 JSON
object. The same table, with notes, is in `data/LAYOUTS.md`.

| layout | manifest line | members | `KEY.json` fields |
|---|---|---|---|
| image-caption | `{"image": PATH, "caption": STR}` | `KEY.jpg` / `KEY.png` / `KEY.webp`, `KEY.txt` (caption), `KEY.json` | `key`, `caption`, `width`, `height`, `source` |
| image-qa | `{"image": PATH, "question": STR, "answer": STR}`, or a conversation: `{"image": PATH, "turns": [{question, answer}, ...]}`, LLaVA `{"image": PATH, "conversations": [{"from", "value"}, ...]}` or chat `{"image": PATH, "messages": [{"role", "content"}, ...]}` | `KEY.jpg` / `KEY.png` / `KEY.webp`, `KEY.json` | `key`, `question`, `answer` (or the conversation field as given), `width`, `height`, `source` |
| audio-text | `{"audio": PATH, "text": STR, "language": STR, "translation": STR (optional)}` | `KEY.flac` / `KEY.wav`, `KEY.json` | `key`, `text`, `language`, `translation` (if given), `duration` (s), `sample_rate` (Hz, of the file), `channels`, `source` |
| video-caption | `{"video": PATH, "caption": STR}` | `KEY.mp4`, `KEY.txt` (caption), `KEY.json` | `key`, `caption`, `duration` (s), `frames`, `width`, `height`, `source` |
| img2dataset output (read as image-caption) | — | `KEY.jpg`, `KEY.txt`, `KEY.json` | `key`, `caption`, `url`, `width`, `height`, `original_width`, `original_height`, `status`, ... |
| video2dataset output (read as video-caption) | — | `KEY.mp4`, `KEY.txt`, `KEY.json` | `key`, `url`, `caption`, `status`, ... (plus whatever metadata it was asked to record) |

Rules of the writer:

- The image extension comes from the file's content (Pillow's format: JPEG/MPO → `jpg`, PNG → `png`,
  WebP → `webp`), not its name; other image formats are skipped with a hint to convert them. Audio must
  be WAV (→ `wav`) or FLAC (→ `flac`), video an MP4 container (→ `mp4`). Files are copied byte for byte.
- `width`/`height` are those of the decoded image after EXIF orientation (what the model sees).
  `source` is the media path exactly as written in the manifest. Other fields of a line (`id`,
  `license`, `translation_language`, ...) are copied into `KEY.json` unchanged; a line that sets a
  field the writer computes (`width`, `height`, `duration`, `sample_rate`, `channels`, `frames`,
  `source`) is skipped.
- `"key"` (optional) names the sample; otherwise the key is the 1-based line number as `%09d`
  (`000000012` for line 12), so a rerun gives the same keys. Keys use ASCII letters, digits, `_`, `-`.
- Relative media paths resolve against the manifest's folder; `~` expands to the home folder.
- A conversation (`turns`, `conversations` or `messages`; one per line, without `question` / `answer`) is
  checked with the reader training uses (`records.read_question_answer`): roles alternating user /
  assistant after an optional system message, string texts, at most one `<image>` marker or image part,
  in the first user message. A trailing user message is kept in `KEY.json` and dropped when read.
- Each media file is decoded with `mm_llama.data.decoders` before it is written. A line is skipped
  (reported with line number, file and reason, never fatal) for: invalid JSON or a non-object, an unknown
  or ambiguous layout, a missing or unreadable file, undecodable or unsupported media, an empty or
  non-string text field, an invalid or repeated key. Blank lines are ignored.
- A line is parsed with `mm_llama.data.json_limits.loads_limited`: nesting deeper than `MAX_JSON_DEPTH`
  (64), an integer over Python's 4300-digit limit or a string with a lone surrogate (`"\\ud800"`) is a
  skipped line like any other, never an abort; so is any unexpected error while checking one line.
- Output: `OUT_DIR/shard-NNNNNN.tar` (written atomically, see `shard_writer`) and `OUT_DIR/stats.json`
  with `samples`, `bytes`, `shards` (file names), `shard_samples` (samples per shard file: readers use it
  to say how many samples a damaged shard lost), `layouts` (samples per layout), `skipped` (count) and
  `skipped_samples` (`[{"line", "file", "reason"}]`). Same manifest and files → byte-identical shards.
- `overwrite=True` replaces an earlier run only when the new one succeeds (new shards are staged in a
  hidden folder inside `OUT_DIR`, then moved over the old ones, then `stats.json` is rewritten); a run
  that raises, is interrupted, or writes no sample at all leaves the old shards and `stats.json` intact.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import soundfile
from PIL import Image
from tqdm import tqdm

from mm_llama.atomic_file import atomic_write
from mm_llama.data.decoders import (
    DecodeError,
    audio_duration,
    decode_audio,
    decode_image,
    decode_video,
    video_duration,
    video_frame_count,
)
from mm_llama.data.json_limits import JSONLimitError, loads_limited
from mm_llama.data.records import CHAT_FIELDS, RecordError, read_question_answer
from mm_llama.data.shard_writer import ShardWriter, validate_key

__all__ = ["LAYOUTS", "ManifestError", "write_shards"]

LAYOUTS = ("image-caption", "image-qa", "audio-text", "video-caption")
MEDIA_FIELDS = ("image", "audio", "video")
CONVERSATION_FIELDS = ("turns", *CHAT_FIELDS)
COMPUTED_FIELDS = ("width", "height", "duration", "sample_rate", "channels", "frames", "source")
MB = 1_000_000

_IMAGE_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_AUDIO_EXT = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac"}


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing, a folder, unreadable); nothing was written."""


class _Skip(Exception):
    """A manifest line that cannot become a sample; `reason` says why, `file` names the media file."""

    def __init__(self, reason: str, file: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.file = file


@dataclass
class _Sample:
    key: str
    layout: str
    files: dict[str, bytes]


# --------------------------------------------------------------------------------------------------
# one line


def _text(line: dict[str, Any], field: str, *, optional: bool = False) -> str | None:
    value = line.get(field)
    if value is None:
        if optional:
            return None
        raise _Skip(f"missing {field!r}")
    if not isinstance(value, str):
        raise _Skip(f"{field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _Skip(f"{field!r} is empty")
    return value


def _layout(line: dict[str, Any]) -> str:
    media = [f for f in MEDIA_FIELDS if f in line]
    if len(media) != 1:
        found = f"fields {sorted(line)}" if not media else f"several media fields {media}"
        raise _Skip(
            f"unknown layout ({found}); each line needs exactly one of 'image', 'audio', 'video' "
            "(see data/LAYOUTS.md)"
        )
    kind = media[0]
    if kind == "image":
        qa = any(f in line for f in ("question", "answer", *CONVERSATION_FIELDS))
        if qa and "caption" in line:
            raise _Skip(
                "ambiguous layout: has 'caption' and 'question'/'answer'/a conversation; put captions and QA pairs "
                "on separate lines"
            )
        return "image-qa" if qa else "image-caption"
    return "audio-text" if kind == "audio" else "video-caption"


def _conversation(line: dict[str, Any]) -> str:
    """The conversation field of a line (``turns``, ``conversations`` or ``messages``), checked the way
    training reads it (`records.read_question_answer`)."""
    present = [f for f in CONVERSATION_FIELDS if f in line]
    if len(present) > 1:
        raise _Skip(f"has {present}; a line holds one conversation")
    name = present[0]
    if "question" in line or "answer" in line:
        raise _Skip(f"has both {name!r} and 'question'/'answer'; a conversation puts every question in {name!r}")
    try:
        read_question_answer(None, {name: line[name]})
    except RecordError as e:
        raise _Skip(f"{name!r}: {e} ({e.reason})") from None
    return name


def _read_media(line: dict[str, Any], field: str, base: Path) -> tuple[Path, str, bytes]:
    value = line[field]
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"{field!r} must be a non-empty file path, got {value!r:.60}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    shown = str(path)
    if not path.exists():
        raise _Skip("no such file; check the path (relative paths resolve against the manifest's folder)", shown)
    if not path.is_file():
        raise _Skip("not a regular file", shown)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Skip(f"cannot read the file ({type(e).__name__}: {e})", shown) from None
    if not data:
        raise _Skip("the file is empty (0 bytes)", shown)
    return path, value, data


def _image_ext(data: bytes, shown: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image has a lower limit
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or "unknown"
    except Exception as e:  # noqa: BLE001 - decode_image below gives the precise reason
        raise _Skip(f"not a decodable image ({type(e).__name__}: {e})", shown) from None
    if fmt not in _IMAGE_EXT:
        raise _Skip(f"is a {fmt} image; shards store JPEG, PNG or WebP, so convert it first", shown)
    return _IMAGE_EXT[fmt]


def _audio_ext(data: bytes, shown: str) -> tuple[str, Any]:
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise _Skip(f"not a readable audio file ({type(e).__name__}: {e})", shown) from None
    if info.format not in _AUDIO_EXT:
        raise _Skip(
            f"is {info.format} audio; shards store FLAC or WAV, so convert it first (e.g. `ffmpeg -i IN OUT.flac`)",
            shown,
        )
    return _AUDIO_EXT[info.format], info


def _check_mp4(data: bytes, shown: str) -> None:
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            fmt = container.format.name
    except Exception as e:  # noqa: BLE001
        raise _Skip(f"not a readable video container ({type(e).__name__}: {e})", shown) from None
    if "mp4" not in fmt.split(","):
        raise _Skip(
            f"is a {fmt!r} container; shards store MP4, so convert it first (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)",
            shown,
        )


def _extras(line: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    extras = {k: v for k, v in line.items() if k not in used}
    clash = sorted(set(extras) & set(COMPUTED_FIELDS))
    if clash:
        raise _Skip(f"field(s) {clash} are computed by the writer; remove them from the manifest line")
    return extras


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _build(line: dict[str, Any], line_no: int, base: Path) -> _Sample:
    """Turn one parsed manifest line into a sample (decoding its media to validate it) or raise `_Skip`."""
    layout = _layout(line)
    key_value = line.get("key", f"{line_no:09d}")
    try:
        key = validate_key(key_value)
    except ValueError as e:
        raise _Skip(str(e)) from None

    if layout in ("image-caption", "image-qa"):
        texts: tuple[str, ...] = ("caption",) if layout == "image-caption" else ("question", "answer")
        if layout == "image-qa" and any(f in line for f in CONVERSATION_FIELDS):
            texts = (_conversation(line),)
            values: dict[str, Any] = {texts[0]: line[texts[0]]}
        else:
            values = {f: _text(line, f) for f in texts}
        extras = _extras(line, ("key", "image", *texts))
        path, source, data = _read_media(line, "image", base)
        ext = _image_ext(data, str(path))
        try:
            image = decode_image(data, str(path))
        except DecodeError as e:
            raise _Skip(e.reason, str(path)) from None
        meta = {**extras, "key": key, **values, "width": image.width, "height": image.height, "source": source}
        files = {ext: data, "json": _json(meta)}
        if layout == "image-caption":
            files["txt"] = values["caption"].encode("utf-8")  # type: ignore[union-attr]
        return _Sample(key, layout, files)

    if layout == "audio-text":
        values = {"text": _text(line, "text"), "language": _text(line, "language")}
        translation = _text(line, "translation", optional=True)
        extras = _extras(line, ("key", "audio", "text", "language", "translation"))
        path, source, data = _read_media(line, "audio", base)
        ext, info = _audio_ext(data, str(path))
        try:
            duration = audio_duration(data, str(path))
            decode_audio(data, str(path), sample_rate=int(info.samplerate))  # validate; no resampling
        except DecodeError as e:
            raise _Skip(e.reason, str(path)) from None
        meta = {**extras, "key": key, **values}
        if translation is not None:
            meta["translation"] = translation
        meta.update(duration=round(duration, 6), sample_rate=int(info.samplerate), channels=int(info.channels),
                    source=source)
        return _Sample(key, layout, {ext: data, "json": _json(meta)})

    caption = _text(line, "caption")
    extras = _extras(line, ("key", "video", "caption"))
    path, source, data = _read_media(line, "video", base)
    _check_mp4(data, str(path))
    try:
        frames = video_frame_count(data, str(path))
        first = decode_video(data, str(path), num_frames=1)  # decodes the whole stream: validates it
        duration = video_duration(data, str(path))
    except DecodeError as e:
        raise _Skip(e.reason, str(path)) from None
    meta = {**extras, "key": key, "caption": caption, "duration": round(duration, 6), "frames": frames,
            "width": int(first.shape[-1]), "height": int(first.shape[-2]), "source": source}
    assert caption is not None
    return _Sample(key, layout, {"mp4": data, "txt": caption.encode("utf-8"), "json": _json(meta)})


# --------------------------------------------------------------------------------------------------
# the whole manifest


def _open_manifest(manifest: Path) -> int:
    """Check that the manifest is a readable file; return its number of lines."""
    if not manifest.exists():
        raise ManifestError(f"manifest {str(manifest)!r} does not exist; pass the path of a JSONL file")
    if not manifest.is_file():
        raise ManifestError(f"manifest {str(manifest)!r} is not a file; pass the path of a JSONL file")
    try:
        with open(manifest, "rb") as f:
            return sum(1 for _ in f)
    except OSError as e:
        raise ManifestError(f"cannot read manifest {str(manifest)!r} ({type(e).__name__}: {e})") from None


def write_shards(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    max_shard_mb: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Write the manifest's samples to `out_dir/PREFIX-NNNNNN.tar` shards plus `out_dir/stats.json`.

    See the module docstring for the line formats, layouts and skip rules. `max_shard_mb` is in MB of
    10^6 bytes. `overwrite` lets the writer replace shards of an earlier run in `out_dir` (otherwise
    their presence is an error). Returns the stats dict that is also written to `stats.json`.

    Raises `ManifestError` if the manifest cannot be read at all (or, with `overwrite`, when not one line
    could be written: the earlier shards are kept), `ValueError` for invalid options or an `out_dir` that
    already holds shards (without `overwrite`). Bad lines never raise: they are skipped and listed in the
    stats. With `overwrite`, the earlier shards and `stats.json` are replaced only once the new run has
    succeeded; any failure leaves them intact.
    """
    manifest = Path(manifest)
    out = Path(out_dir)
    if max_shard_mb is not None:
        if isinstance(max_shard_mb, bool) or not isinstance(max_shard_mb, (int, float)) or not max_shard_mb > 0:
            raise ValueError(f"max_shard_mb must be a positive number or None, got {max_shard_mb!r}")
    max_bytes = None if max_shard_mb is None else max(1, int(max_shard_mb * MB))
    total_lines = _open_manifest(manifest)
    base = manifest.resolve().parent

    skipped: list[dict[str, Any]] = []
    layouts = dict.fromkeys(LAYOUTS, 0)
    with ShardWriter(out, prefix=prefix, samples_per_shard=samples_per_shard, max_shard_bytes=max_bytes,
                     overwrite=overwrite) as writer, open(manifest, "rb") as f:
        bar = tqdm(f, total=total_lines, unit="line", desc=f"shards {out.name or out}", disable=not progress)
        for line_no, raw in enumerate(bar, start=1):
            file: str | None = None
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Skip(f"the line is not valid UTF-8 ({e})") from None
                if not text.strip():
                    continue
                try:
                    line = loads_limited(text)
                except JSONLimitError as e:
                    raise _Skip(str(e)) from None
                if not isinstance(line, dict):
                    raise _Skip(f"expected a JSON object, got {type(line).__name__}")
                try:
                    sample = _build(line, line_no, base)
                except _Skip:
                    raise
                except Exception as e:  # noqa: BLE001 - one odd line must not cost the lines before it
                    raise _Skip(f"cannot use this line ({type(e).__name__}: {_short(str(e))})") from None
                try:
                    writer.write(sample.key, sample.files)
                except ValueError as e:
                    raise _Skip(str(e)) from None
                layouts[sample.layout] += 1
            except _Skip as s:
                file = s.file
                skipped.append({"line": line_no, "file": file, "reason": s.reason})
                bar.set_postfix(skipped=len(skipped), refresh=False)
        bar.close()
        if writer.replacing and writer.samples == 0:
            # Replacing an earlier run with nothing is a failure, not a result: keep the old shards.
            first = skipped[0] if skipped else None
            example = ""
            if first is not None:
                example = f"; the first, line {first['line']}: " + (f"{first['file']}: " if first["file"] else "")
                example += first["reason"]
            raise ManifestError(
                f"no line of {str(manifest)!r} could be written ({len(skipped)} line(s) skipped{example}). The "
                f"shards and stats.json already in {str(out)!r} were left as they were; fix the manifest and "
                "run again"
            )

    stats: dict[str, Any] = {
        "manifest": str(manifest.resolve()),
        "samples": writer.samples,
        "bytes": writer.bytes,
        "shards": [p.name for p in writer.shards],
        "shard_samples": {p.name: n for p, n in zip(writer.shards, writer.shard_samples)},
        "layouts": layouts,
        "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_bytes,
        "skipped": len(skipped),
        "skipped_samples": skipped,
    }
    atomic_write(out / "stats.json", json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats
