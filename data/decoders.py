"""Decoders for shard members: image bytes → PIL RGB, audio bytes → 16 kHz mono waveform, mp4 bytes → frames.

These are our own decoders; webdataset's built-in video/audio decoders are never used (they call
torchvision/torchaudio APIs that torch 2.11's family removed). Every decoder takes the encoded bytes of
one member plus a `name` that identifies it in errors (by convention `"SHARD:KEY.EXT"`, e.g.
`"shard-000003.tar:abc123.jpg"`), and raises `DecodeError` — never a raw Pillow/soundfile/PyAV
exception — for empty, truncated, corrupt or unsupported input, so a data pipeline can catch one
exception type, count the sample as skipped, and go on.

| function | output |
|---|---|
| `decode_image(data, name)` | `PIL.Image.Image`, mode RGB, EXIF orientation applied; at most `MAX_IMAGE_PIXELS` |
| `decode_audio(data, name, sample_rate=16000)` | `[S]` float32 mono (channels averaged), about ±1 |
| `audio_duration(data, name)` | seconds, from the header (no decoding) |
| `decode_video(data, name, num_frames)` | `[K, 3, H, W]` uint8 RGB, K = `num_frames` uniformly spaced frames; a still image (PNG/JPEG/... demuxer) is rejected |
| `video_frame_count(data, name)` | number of video frames (packets counted, no decoding) |
| `video_duration(data, name)` | seconds, from the container |
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import TypeVar

import av
import numpy as np
import soundfile
import torch
import torchaudio.functional
from PIL import Image

from mm_llama.data.image_transform import load_image, to_rgb

__all__ = [
    "IMAGE_DEMUXERS",
    "MAX_IMAGE_PIXELS",
    "DecodeError",
    "audio_duration",
    "decode_audio",
    "decode_image",
    "decode_video",
    "is_image_format",
    "uniform_frame_indices",
    "video_duration",
    "video_frame_count",
]

T = TypeVar("T")

# Sample rates a file may declare. Outside this range a header is almost certainly corrupt (and a
# rate of a few Hz upsampled to 16 kHz would turn a small file into gigabytes).
MIN_FILE_SAMPLE_RATE = 1_000
MAX_FILE_SAMPLE_RATE = 768_000
# torchaudio's sinc resampler builds a kernel of (new/g) x (orig/g + 2·width) values, g = gcd(orig, new).
# Standard rates (8k…192k) give at most a few 100k values; an odd rate such as 44 101 Hz would need
# 16000 x 44113 (2.8 GB), so such files are rejected with a clear message instead.
MAX_RESAMPLE_KERNEL = 1 << 24
# Images: width x height at most, read from the header before decoding. Pillow's own bomb limit
# (about 179 megapixels, a warning from 89) lets a 17 KB PNG declaring 12000 x 12000 pixels decode
# in full (12.5 s and 2.2 GB for one sample). Tiling never uses more than max_tiles (≤ 16) tiles of
# 560², about 5 megapixels, so 40 megapixels (a 7,300² photo; a 50 MP camera frame must be downscaled)
# keeps every real photo while bounding one sample's memory to ~120 MB of RGB.
MAX_IMAGE_PIXELS = 40_000_000
# A video member must hold a video: FFmpeg also "demuxes" a single PNG/JPEG/WebP/BMP (the *_pipe
# demuxers), image sequences (image2) and GIFs, which would otherwise pass as one-frame clips.
IMAGE_DEMUXERS = frozenset({"image2", "image2pipe", "gif", "apng", "ico", "tiff", "webp", "jpegxl_anim"})


class DecodeError(ValueError):
    """A shard member (or local media file) could not be decoded.

    `name` identifies the sample (e.g. `"shard-000003.tar:abc123.jpg"`, or a file path) and `reason`
    says what was wrong; `str(error)` is `"cannot decode NAME: REASON"`. Pickles (DataLoader workers
    send exceptions between processes).
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"cannot decode {name}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.name, self.reason))


def _as_bytes(data: object, name: str) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise DecodeError(name, "the data is empty (0 bytes); the file or shard member holds nothing")
        return bytes(data)
    raise TypeError(f"{name}: expected encoded bytes, got {type(data).__name__}")


def _guard(name: str, what: str, fn: Callable[[], T]) -> T:
    """Run a library call on untrusted bytes; any failure becomes a `DecodeError` naming `name`.

    Broad on purpose: Pillow, libsndfile and FFmpeg raise many exception types on corrupt input
    (OSError, RuntimeError, struct.error, IndexError, av.error.*, ...), and a data loader must see one.
    """
    try:
        return fn()
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - see docstring
        raise DecodeError(name, f"{what} ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------
# images


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode an encoded image (JPEG, PNG, WebP, ... anything Pillow opens) to RGB.

    EXIF orientation is applied and colour is converted as `mm_llama.data.image_transform.to_rgb`
    does (transparency composited onto white, 16-bit greyscale scaled to 8 bits). Returns a fully
    loaded `PIL.Image.Image` of mode RGB, size (W, H). Raises `DecodeError` for empty, truncated,
    corrupt or unrecognised data, and for an image whose header declares more than
    `MAX_IMAGE_PIXELS` pixels (checked before decoding).
    """
    raw = _as_bytes(data, name)
    try:
        image = load_image(raw, source=name, max_pixels=MAX_IMAGE_PIXELS)
    except ValueError as e:
        reason = str(e)
        prefix = f"cannot read {name}: "
        raise DecodeError(name, reason[len(prefix):] if reason.startswith(prefix) else reason) from e
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise assorted types on fuzzed input
        raise DecodeError(name, f"not a decodable image ({type(e).__name__}: {e})") from e
    rgb = _guard(name, "cannot convert the image to RGB", lambda: to_rgb(image))
    if rgb.width < 1 or rgb.height < 1:
        raise DecodeError(name, f"the image has no pixels (size {rgb.width}x{rgb.height})")
    return rgb


# --------------------------------------------------------------------------------------------------
# audio


def _check_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    return sample_rate


def _resample_kernel_size(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> int:
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(lowpass_filter_width * o / (min(o, n) * rolloff))
    return n * (o + 2 * width)


def audio_duration(data: bytes, name: str) -> float:
    """Duration in seconds (`frames / sample rate`) read from the header with `soundfile.info`.

    Cheap: nothing is decoded. Raises `DecodeError` if the header cannot be read or declares no
    audio frames or a non-positive sample rate.
    """
    raw = _as_bytes(data, name)
    info = _guard(name, "not a readable audio file (WAV, FLAC, OGG, MP3, ...)",
                  lambda: soundfile.info(io.BytesIO(raw)))
    if info.samplerate <= 0:
        raise DecodeError(name, f"the header declares a sample rate of {info.samplerate} Hz")
    if info.frames <= 0:
        raise DecodeError(name, "the file contains no audio frames")
    return float(info.frames) / float(info.samplerate)


def decode_audio(data: bytes, name: str, sample_rate: int = 16000) -> torch.Tensor:
    """Decode audio bytes with soundfile (WAV, FLAC, OGG/Vorbis, MP3, ...) to a mono waveform.

    Channels are averaged; if the file's rate differs from `sample_rate` the waveform is resampled with
    `torchaudio.functional.resample` (windowed sinc, its defaults). Integer PCM decodes to [-1, 1);
    float files keep their values (usually within ±1) and resampling may overshoot ±1 slightly.

    Returns `[S]` float32, S ≈ frames · sample_rate / file_rate. Raises `DecodeError` for empty, corrupt
    or unreadable data, a file without audio frames, non-finite samples, or a declared sample rate
    outside [1 kHz, 768 kHz] or one whose resampling kernel would be impractically large.
    """
    raw = _as_bytes(data, name)
    sample_rate = _check_rate(sample_rate)

    def read() -> tuple[np.ndarray, int]:
        with soundfile.SoundFile(io.BytesIO(raw)) as f:
            rate = f.samplerate
            if not MIN_FILE_SAMPLE_RATE <= rate <= MAX_FILE_SAMPLE_RATE:
                raise DecodeError(
                    name, f"the file declares a sample rate of {rate} Hz, outside the supported "
                    f"{MIN_FILE_SAMPLE_RATE}–{MAX_FILE_SAMPLE_RATE} Hz; the header is corrupt or the file "
                    "needs converting"
                )
            return f.read(dtype="float32", always_2d=True), rate

    frames, file_rate = _guard(name, "not a decodable audio file (WAV, FLAC, OGG, MP3, ...)", read)
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise DecodeError(name, "the file contains no audio frames")
    if not np.isfinite(frames).all():
        raise DecodeError(name, "the audio contains NaN or infinite samples (a corrupt float WAV?)")
    wave = torch.from_numpy(np.ascontiguousarray(frames.mean(axis=1, dtype=np.float32)))
    if file_rate != sample_rate:
        if _resample_kernel_size(file_rate, sample_rate) > MAX_RESAMPLE_KERNEL:
            raise DecodeError(
                name, f"resampling {file_rate} Hz to {sample_rate} Hz needs an impractically large filter "
                "(the two rates share no large common divisor); convert the file to a standard rate "
                "such as 16000, 44100 or 48000 Hz"
            )
        wave = torchaudio.functional.resample(wave, file_rate, sample_rate)
    return wave.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------------
# video


def uniform_frame_indices(num_available: int, num_frames: int) -> list[int]:
    """`round(linspace(0, n - 1, K))` as Python ints (round half to even, as torch/numpy do).

    Spans the whole clip: the first and last frames are always included (K ≥ 2). With fewer than K
    frames available some indices repeat, so a short clip still yields K frames.
    """
    if num_available < 1:
        raise ValueError(f"need at least one frame to sample from, got {num_available}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    return torch.linspace(0, num_available - 1, num_frames, dtype=torch.float64).round().long().tolist()


def _open(raw: bytes, name: str) -> av.container.InputContainer:
    container = _guard(
        name, "not a readable video container (expected mp4)", lambda: av.open(io.BytesIO(raw), mode="r")
    )
    fmt = container.format.name
    if is_image_format(fmt):
        container.close()
        raise DecodeError(
            name, f"this is a still image (FFmpeg reads it with its {fmt!r} demuxer), not a video container; "
            "store videos as MP4 (or WebM/MKV/MOV/AVI) and images as image members"
        )
    if not container.streams.video:
        container.close()
        raise DecodeError(name, "the container has no video stream")
    return container


def is_image_format(format_name: str) -> bool:
    """True for FFmpeg demuxer names (``container.format.name``, possibly comma-separated) that read
    still images or image sequences (``png_pipe``, ``jpeg_pipe``, ``image2``, ``gif``, ...)."""
    names = [n.strip() for n in format_name.split(",")]
    return any(n.endswith("_pipe") or n in IMAGE_DEMUXERS for n in names)


def _count_packets(raw: bytes, name: str) -> int:
    container = _open(raw, name)
    try:
        stream = container.streams.video[0]
        return _guard(name, "the video stream is corrupt",
                      lambda: sum(1 for p in container.demux(stream) if p.size > 0))
    finally:
        container.close()


def video_frame_count(data: bytes, name: str) -> int:
    """Number of frames in the first video stream, counted from its packets without decoding.

    For an intact file this equals the number of frames `decode_video` decodes. Raises `DecodeError`
    for unreadable data, a container without a video stream, or a stream with no frames.
    """
    raw = _as_bytes(data, name)
    n = _count_packets(raw, name)
    if n == 0:
        raise DecodeError(name, "the video stream has no frames")
    return n


def video_duration(data: bytes, name: str) -> float:
    """Duration in seconds of the first video stream (stream duration, else the container's).

    Read from the container header, nothing is decoded; 0.0 when neither declares a duration.
    Raises `DecodeError` for unreadable data or a container without a video stream.
    """
    raw = _as_bytes(data, name)
    container = _open(raw, name)
    try:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        if container.duration is not None and container.duration > 0:
            return float(container.duration) / av.time_base
        return 0.0
    finally:
        container.close()


def _decode_selected(raw: bytes, name: str, indices: list[int]) -> tuple[dict[int, torch.Tensor], int]:
    """Decode the whole first video stream once; keep frames at `indices` as `[3, H, W]` uint8.

    Returns the kept frames by index and the number of frames decoded. All kept frames are converted to
    the size of the first kept frame (a corrupt stream may change resolution midway).
    """
    wanted = set(indices)
    kept: dict[int, torch.Tensor] = {}
    size: tuple[int, int] | None = None
    container = _open(raw, name)
    try:
        stream = container.streams.video[0]
        n = 0

        def run() -> int:
            nonlocal n, size
            for frame in container.decode(stream):
                if n in wanted:
                    if size is None:
                        size = (frame.width, frame.height)
                    rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                    kept[n] = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
                n += 1
            return n

        decoded = _guard(name, "the video data is corrupt or truncated", run)
    finally:
        container.close()
    return kept, decoded


def decode_video(data: bytes, name: str, num_frames: int) -> torch.Tensor:
    """Decode K = `num_frames` frames spread uniformly over the whole clip (PyAV, in memory).

    Frame indices are `uniform_frame_indices(n, K)` = `round(linspace(0, n - 1, K))` over the n frames
    of the first video stream, in presentation order; clips shorter than K frames repeat frames.
    Returns `[K, 3, H, W]` uint8 RGB. Raises `DecodeError` for empty, corrupt or truncated data, a
    still image (FFmpeg's image demuxers: `png_pipe`, `jpeg_pipe`, `image2`, `gif`, ...; see
    `IMAGE_DEMUXERS`), a container without a video stream, or a stream that decodes to no frames.
    """
    raw = _as_bytes(data, name)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    n = _count_packets(raw, name)
    if n == 0:
        raise DecodeError(name, "the video stream has no frames")
    indices = uniform_frame_indices(n, num_frames)
    kept, decoded = _decode_selected(raw, name, indices)
    if decoded != n:
        # Packets and decoded frames disagree (corrupt packets, dropped frames): sample again over the
        # frames that really decode, so the spacing stays uniform over what the clip shows.
        if decoded == 0:
            raise DecodeError(name, "the video stream decodes to no frames")
        n = decoded
        indices = uniform_frame_indices(n, num_frames)
        kept, decoded = _decode_selected(raw, name, indices)
        if decoded != n or any(i not in kept for i in indices):
            raise DecodeError(
                name, f"decoding is not repeatable ({n} then {decoded} frames); the stream is corrupt"
            )
    return torch.stack([kept[i] for i in indices])
