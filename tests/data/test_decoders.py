"""Decoders: real tiny media made in memory (Pillow, soundfile, PyAV) round-trip; bad bytes → DecodeError."""

from __future__ import annotations

import io
import math
import pickle

import av
import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm_llama.data.decoders import (
    DecodeError,
    audio_duration,
    decode_audio,
    decode_image,
    decode_video,
    uniform_frame_indices,
    video_duration,
    video_frame_count,
)

# --------------------------------------------------------------------------------------------------
# media factories (also used by test_manifest.py)


def make_image(fmt: str = "PNG", size: tuple[int, int] = (24, 16), color: tuple[int, ...] = (200, 30, 60),
               mode: str = "RGB", **save: object) -> bytes:
    """Encoded image bytes of one flat colour; `size` is (W, H)."""
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def sine(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    """`[S]` float32 sine wave."""
    t = np.arange(int(round(seconds * rate)), dtype=np.float64) / rate
    return (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def make_audio(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    """Encode `[S]` or `[S, C]` float samples with soundfile."""
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def frame_value(i: int, n: int) -> int:
    """Red level that encodes frame index `i` of `n` (distinct by ≥ 20 for n ≤ 12)."""
    return 0 if n == 1 else round(i * 220 / (n - 1))


def make_mp4(n_frames: int = 10, size: tuple[int, int] = (64, 48), fps: int = 10, codec: str = "libx264") -> bytes:
    """An mp4 whose frame i is flat with red = frame_value(i, n) and green = 255 - red; `size` is (W, H)."""
    w, h = size
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n_frames):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = frame_value(i, n_frames)
            a[..., 1] = 255 - frame_value(i, n_frames)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def frame_indices_of(frames: torch.Tensor, n: int) -> list[int]:
    """Recover the encoded index of each `[K, 3, H, W]` frame from its mean red level."""
    reds = frames[:, 0].float().mean(dim=(1, 2))
    levels = torch.tensor([frame_value(i, n) for i in range(n)], dtype=torch.float32)
    return (reds[:, None] - levels[None]).abs().argmin(dim=1).tolist()


PNG = make_image("PNG")
JPEG = make_image("JPEG", quality=90)
WAV_16K = make_audio(sine(0.25, 16000), 16000)
FLAC_44K_STEREO = make_audio(np.stack([sine(0.2, 44100, 440), sine(0.2, 44100, 880, 0.25)], axis=1), 44100, "FLAC")
MP4 = make_mp4(10)

# --------------------------------------------------------------------------------------------------
# DecodeError


def test_decode_error_names_sample_and_pickles() -> None:
    e = DecodeError("shard-000003.tar:abc123.jpg", "truncated")
    assert isinstance(e, ValueError)
    assert "shard-000003.tar:abc123.jpg" in str(e) and "truncated" in str(e)
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.name, back.reason, str(back)) == (DecodeError, e.name, e.reason, str(e))


# --------------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("data", [PNG, JPEG], ids=["png", "jpeg"])
def test_decode_image_round_trip(data: bytes) -> None:
    im = decode_image(data, "s.tar:k.img")
    assert im.mode == "RGB" and im.size == (24, 16)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(axis=0)
    assert abs(r - 200) < 4 and abs(g - 30) < 4 and abs(b - 60) < 4


def test_decode_image_converts_modes_to_rgb() -> None:
    assert decode_image(make_image("PNG", mode="L", color=77), "grey.png").mode == "RGB"
    rgba = decode_image(make_image("PNG", mode="RGBA", color=(0, 0, 0, 0)), "clear.png")
    assert rgba.mode == "RGB" and np.asarray(rgba).min() == 255  # transparent → white, as to_rgb does
    assert decode_image(make_image("WEBP", lossless=True), "w.webp").size == (24, 16)


def test_decode_image_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = make_image("JPEG", size=(30, 10), exif=exif.tobytes())
    assert decode_image(data, "rot.jpg").size == (10, 30)


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", PNG[:40], JPEG[: len(JPEG) // 2]],
    ids=["empty", "garbage", "png-head", "jpeg-half"],
)
def test_decode_image_bad_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError, match="shard-000001.tar:bad.jpg"):
        decode_image(data, "shard-000001.tar:bad.jpg")


def test_decode_image_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="expected encoded bytes"):
        decode_image("x.png", "k")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# audio


def test_decode_audio_wav_16k_is_exact() -> None:
    wave = decode_audio(WAV_16K, "a.wav")
    pcm, rate = soundfile.read(io.BytesIO(WAV_16K), dtype="int16")
    assert wave.dtype == torch.float32 and wave.shape == (4000,) and rate == 16000
    torch.testing.assert_close(wave, torch.from_numpy(pcm.astype(np.float32) / 32768), rtol=0, atol=0)
    torch.testing.assert_close(wave, torch.from_numpy(sine(0.25, 16000)), rtol=0, atol=1e-4)
    assert audio_duration(WAV_16K, "a.wav") == pytest.approx(0.25)


def test_decode_audio_flac_44k_stereo_averages_and_resamples() -> None:
    wave = decode_audio(FLAC_44K_STEREO, "a.flac")
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert wave.shape[0] == math.ceil(8820 * 16000 / 44100)
    stereo, rate = soundfile.read(io.BytesIO(FLAC_44K_STEREO), dtype="float32", always_2d=True)
    assert rate == 44100 and stereo.shape == (8820, 2)
    expected = torchaudio.functional.resample(torch.from_numpy(stereo.mean(axis=1)), 44100, 16000)
    torch.testing.assert_close(wave, expected)
    assert wave.abs().max() <= 1.0 and wave.abs().max() > 0.3
    assert audio_duration(FLAC_44K_STEREO, "a.flac") == pytest.approx(0.2)
    # another target rate, no resampling when rates agree
    assert decode_audio(FLAC_44K_STEREO, "a.flac", sample_rate=44100).shape == (8820,)
    assert decode_audio(FLAC_44K_STEREO, "a.flac", sample_rate=8000).shape == (math.ceil(8820 * 8000 / 44100),)


def test_decode_audio_ogg() -> None:
    data = make_audio(sine(0.5, 16000), 16000, "OGG", "VORBIS")
    wave = decode_audio(data, "a.ogg")
    assert abs(wave.shape[0] - 8000) <= 1 and wave.abs().max() > 0.2


@pytest.mark.parametrize(
    "data", [b"", b"RIFF....WAVEfmt garbage", WAV_16K[:20], FLAC_44K_STEREO[:30]],
    ids=["empty", "garbage", "wav-head", "flac-head"],
)
def test_decode_audio_bad_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError, match="s.tar:k.wav"):
        decode_audio(data, "s.tar:k.wav")
    with pytest.raises(DecodeError, match="s.tar:k.wav"):
        audio_duration(data, "s.tar:k.wav")


def test_decode_audio_rejects_odd_and_absurd_rates_and_nan() -> None:
    with pytest.raises(DecodeError, match="impractically large filter"):
        decode_audio(make_audio(sine(0.05, 44101), 44101), "odd.wav")
    with pytest.raises(DecodeError, match="outside the supported"):
        decode_audio(make_audio(sine(0.5, 200), 200), "slow.wav")
    bad = sine(0.05, 16000)
    bad[10] = np.nan
    with pytest.raises(DecodeError, match="NaN"):
        decode_audio(make_audio(bad, 16000, subtype="FLOAT"), "nan.wav")
    with pytest.raises(DecodeError, match="no audio frames"):
        decode_audio(make_audio(np.zeros(0, np.float32), 16000), "empty.wav")
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        decode_audio(WAV_16K, "a.wav", sample_rate=0)


# --------------------------------------------------------------------------------------------------
# video


def test_uniform_frame_indices() -> None:
    assert uniform_frame_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_frame_indices(1, 3) == [0, 0, 0]
    assert uniform_frame_indices(7, 1) == [0]
    for n, k in [(10, 15), (100, 8), (33, 32), (5, 5)]:
        assert uniform_frame_indices(n, k) == np.round(np.linspace(0, n - 1, k)).astype(int).tolist()
    with pytest.raises(ValueError, match="num_frames"):
        uniform_frame_indices(5, 0)


def test_decode_video_uniform_sampling() -> None:
    frames = decode_video(MP4, "v.mp4", 4)
    assert frames.shape == (4, 3, 48, 64) and frames.dtype == torch.uint8
    assert frame_indices_of(frames, 10) == [0, 3, 6, 9]
    assert frame_indices_of(decode_video(MP4, "v.mp4", 10), 10) == list(range(10))
    assert frame_indices_of(decode_video(MP4, "v.mp4", 1), 10) == [0]


def test_decode_video_short_clip_repeats_frames() -> None:
    frames = decode_video(make_mp4(3), "short.mp4", 7)
    assert frames.shape == (7, 3, 48, 64)
    assert frame_indices_of(frames, 3) == uniform_frame_indices(3, 7) == [0, 0, 1, 1, 1, 2, 2]


def test_video_frame_count_and_duration() -> None:
    assert video_frame_count(MP4, "v.mp4") == 10
    assert video_duration(MP4, "v.mp4") == pytest.approx(1.0)


def test_decode_video_without_video_stream() -> None:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(DecodeError, match="no video stream"):
        decode_video(buf.getvalue(), "audio-only.mp4", 2)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x18ftypmp42 garbage", MP4[:200], MP4[: len(MP4) // 2]],
                         ids=["empty", "garbage", "head", "half"])
def test_decode_video_bad_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError, match="s.tar:k.mp4"):
        decode_video(data, "s.tar:k.mp4", 4)
    with pytest.raises(DecodeError, match="s.tar:k.mp4"):
        video_frame_count(data, "s.tar:k.mp4")


def test_decode_video_rejects_bad_num_frames() -> None:
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        decode_video(MP4, "v.mp4", 0)


# --------------------------------------------------------------------------------------------------
# fuzz: random byte flips and truncation never raise anything but DecodeError


def _corrupt(data: bytes, flips: list[tuple[float, int]], keep: float) -> bytes:
    out = bytearray(data)
    for where, value in flips:
        out[min(int(where * len(out)), len(out) - 1)] = value
    return bytes(out[: max(0, int(round(keep * len(out))))])


corruptions = st.tuples(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=0, max_size=8),
    st.one_of(st.just(1.0), st.floats(0, 1)),
)
fuzz = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(corruption=corruptions, fmt=st.sampled_from(["png", "jpeg"]))
def test_fuzz_image(corruption: tuple[list[tuple[float, int]], float], fmt: str) -> None:
    data = _corrupt(PNG if fmt == "png" else JPEG, *corruption)
    try:
        im = decode_image(data, "fuzz.img")
    except DecodeError:
        return
    assert im.mode == "RGB" and im.width > 0 and im.height > 0


@fuzz
@given(corruption=corruptions, fmt=st.sampled_from(["wav", "flac"]))
def test_fuzz_audio(corruption: tuple[list[tuple[float, int]], float], fmt: str) -> None:
    data = _corrupt(WAV_16K if fmt == "wav" else FLAC_44K_STEREO, *corruption)
    try:
        wave = decode_audio(data, "fuzz.audio")
    except DecodeError:
        return
    assert wave.dtype == torch.float32 and wave.ndim == 1 and wave.numel() > 0
    assert torch.isfinite(wave).all() and wave.abs().max() <= 1.5
    assert audio_duration(data, "fuzz.audio") > 0


@fuzz
@given(corruption=corruptions, k=st.integers(1, 12))
def test_fuzz_video(corruption: tuple[list[tuple[float, int]], float], k: int) -> None:
    data = _corrupt(MP4, *corruption)
    try:
        frames = decode_video(data, "fuzz.mp4", k)
    except DecodeError:
        return
    assert frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[0] == k and frames.shape[1] == 3
    assert frames.shape[2] > 0 and frames.shape[3] > 0
