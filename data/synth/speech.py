"""`speech`: spoken grammar sentences and digit strings, synthesised with espeak-ng, as 16 kHz FLAC.

Content (drawn per sample): a scene caption (50 %), a scene question (20 %), a clip caption (10 %) or a
digit string of 3–7 digits spoken as words (20 %). The split is decided by the normalised words
(lowercase, no punctuation), so no sentence is spoken in two splits.

Voices: ``LANGUAGE+VARIANT`` over every bundled English accent (`ACCENTS`); the variant (the speaker:
pitch, formants, breathiness) is partitioned by split in `SPLIT_VARIANTS`, so the ``test`` split's
voices never occur in ``train`` (nor in ``val``). Rate (`RATE_RANGE` words per minute) and pitch
(`PITCH_RANGE`) vary per sample. With probability ``noise_prob`` white noise is added at an SNR drawn
from `SNR_DB_RANGE`.

espeak-ng's 22050 Hz output is resampled to 16 kHz with a Kaiser-windowed sinc filter (`resample`),
peak-limited, and written as 16-bit FLAC. Record (``speech`` layout): ``KEY.flac`` + ``KEY.json`` with
``text``, ``language`` ("English"), ``duration`` (seconds), ``sample_rate``, ``voice``, ``rate``,
``pitch``, ``snr_db`` (null without noise), ``source`` and, for digit strings, ``digits``.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from mm_llama.data.synth import espeak, grammar
from mm_llama.data.synth.splits import check_split, draw_in_split, sample_key, sample_rng

KIND = "speech"
SAMPLE_RATE = 16_000
LANGUAGE = "English"
ACCENTS: tuple[str, ...] = (
    "en", "en-029", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us", "en-us-nyc",
)
"""Every English accent bundled with espeakng-loader except ``en-shaw`` (a spelling reform, not an
accent)."""
SPLIT_VARIANTS: dict[str, tuple[str, ...]] = {
    "train": ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3"),
    "val": ("m6", "f4"),
    "test": ("m7", "m8", "f5"),
}
"""Voice variants (speakers) per split; pairwise disjoint."""
RATE_RANGE = (80, 100)
"""espeak-ng words per minute. espeak-ng's nominal rate is slow on paper: 100 gives about 0.3 s per word
of these short-word sentences (about 200 real words per minute)."""
PAD_RANGE = (0.1, 0.3)
"""Seconds of silence added before and after the speech (each drawn separately)."""
PITCH_RANGE = (30, 70)
"""espeak-ng base pitch (0–100, 50 = the variant's normal pitch)."""
SNR_DB_RANGE = (10.0, 30.0)
LAYOUTS: tuple[str, ...] = ("speech",)
"""Sub-folder (webdataset layout) that the ``speech`` kind writes."""


def split_voices(split: str) -> tuple[str, ...]:
    """All voices (``ACCENT+VARIANT``) the split uses."""
    check_split(split)
    return tuple(f"{a}+{v}" for v in SPLIT_VARIANTS[split] for a in ACCENTS)


@lru_cache(maxsize=None)
def _kaiser_sinc_bank(up: int, down: int, half_width: int, beta: float) -> np.ndarray:
    """Polyphase filter bank ``[up, 2*half_width]``: row ``p`` interpolates at fractional offset ``p/up``."""
    cutoff = 0.5 * min(1.0, up / down) * 0.94  # cycles per input sample, a little below the new Nyquist
    taps = np.arange(-half_width + 1, half_width + 1, dtype=np.float64)  # offsets from floor(t)
    frac = np.arange(up, dtype=np.float64)[:, None] / up
    x = taps[None, :] - frac  # input sample position minus output time
    window = np.i0(beta * np.sqrt(np.clip(1 - (x / half_width) ** 2, 0.0, 1.0))) / np.i0(beta)
    h = 2 * cutoff * np.sinc(2 * cutoff * x) * window
    return h / h.sum(axis=1, keepdims=True)


def resample(x: np.ndarray, sr_in: int, sr_out: int, *, half_width: int = 24, beta: float = 8.0) -> np.ndarray:
    """Band-limited resampling of a mono signal ``[N]`` (float) from ``sr_in`` to ``sr_out`` Hz.

    Output ``[ceil(N * sr_out / sr_in)]`` float64; pure numpy, deterministic.
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a mono signal [N], got shape {tuple(x.shape)}")
    if sr_in == sr_out or x.size == 0:
        return x.copy()
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    bank = _kaiser_sinc_bank(up, down, half_width, beta)
    taps = bank.shape[1]
    n_out = -(-x.size * up // down)
    padded = np.concatenate([np.zeros(half_width), x, np.zeros(half_width + down + taps)])
    out = np.empty(n_out, dtype=np.float64)
    step = padded.strides[0]
    # output n = p + up*m reads inputs floor(n*down/up) - half_width + 1 + k, k < taps: for a fixed phase
    # p that is a strided window view (no copy) times that phase's filter
    for p in range(min(up, n_out)):
        m = (n_out - p + up - 1) // up
        start = (p * down) // up + 1  # + half_width of padding - half_width + 1
        view = np.lib.stride_tricks.as_strided(padded[start:], shape=(m, taps), strides=(down * step, step),
                                               writeable=False)
        out[p::up] = view @ bank[(p * down) % up]
    return out


def normalise_text(text: str) -> str:
    """Lowercase words without punctuation: the content that decides the split."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


@dataclass(frozen=True)
class Utterance:
    """What one sample says: ``text`` (the transcript, also what espeak-ng reads), its ``source``
    (``caption``, ``question``, ``clip``, ``digits``) and the digit string for ``digits``."""

    text: str
    source: str
    digits: str | None = None


def random_utterance(rng: random.Random) -> Utterance:
    """Draw one utterance from the grammar."""
    u = rng.random()
    if u < 0.5:
        return Utterance(grammar.caption(grammar.random_scene(rng), rng), "caption")
    if u < 0.7:
        scene = grammar.random_scene(rng)
        return Utterance(rng.choice(grammar.scene_qa(scene, rng)).question, "question")
    if u < 0.8:
        return Utterance(grammar.clip_caption(grammar.random_clip(rng), rng), "clip")
    digits = grammar.random_digits(rng)
    return Utterance(grammar.digit_words(digits), "digits", digits)


def _describe(u: Utterance) -> str:
    return "speech:" + normalise_text(u.text)


def encode_flac(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """int16 mono ``[N]`` → FLAC bytes (16-bit)."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@dataclass
class SpeechSample:
    """One synthesised utterance."""

    key: str
    flac: bytes
    utterance: Utterance
    voice: str
    rate: int
    pitch: int
    snr_db: float | None
    num_samples: int
    meta: dict[str, Any]

    @property
    def duration(self) -> float:
        return self.num_samples / SAMPLE_RATE

    def json_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "text": self.utterance.text, "language": LANGUAGE, "duration": round(self.duration, 6),
            "sample_rate": SAMPLE_RATE, "voice": self.voice, "rate": self.rate, "pitch": self.pitch,
            "snr_db": self.snr_db, "source": self.utterance.source, **self.meta,
        }
        if self.utterance.digits is not None:
            d["digits"] = self.utterance.digits
        return d

    def records(self) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """Webdataset records per layout: ``{"speech": [(KEY, {"flac", "json"})]}``."""
        js = json.dumps(self.json_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        return {"speech": [(self.key, {"flac": self.flac, "json": js})]}


def speech_transcript(seed: int, split: str, index: int) -> str:
    """The transcript of sample ``index`` for ``(seed, split)``, without synthesising its audio (the same
    text `make_speech_sample` speaks: the utterance is the sample's first draw)."""
    return draw_in_split(random_utterance, _describe, sample_rng(KIND, seed, split, index), split).text


def make_speech_sample(seed: int, split: str, index: int, *, noise_prob: float = 0.0) -> SpeechSample:
    """Sample ``index`` of the ``speech`` kind for ``(seed, split)``."""
    if not 0.0 <= noise_prob <= 1.0:
        raise ValueError(f"noise_prob must be in [0, 1], got {noise_prob}")
    rng = sample_rng(KIND, seed, split, index)
    utt = draw_in_split(random_utterance, _describe, rng, split)
    voice = rng.choice(split_voices(split))
    rate = rng.randint(*RATE_RANGE)
    pitch = rng.randint(*PITCH_RANGE)
    # every draw happens whatever noise_prob is, so noise_prob changes nothing but the noise
    noisy = rng.random() < noise_prob
    snr = round(rng.uniform(*SNR_DB_RANGE), 2)
    snr_db = snr if noisy else None
    noise_seed = rng.getrandbits(64)
    espeak_seed = rng.getrandbits(31)
    pad_seconds = (rng.uniform(*PAD_RANGE), rng.uniform(*PAD_RANGE))

    raw = espeak.synthesize(utt.text, voice, rate=rate, pitch=pitch, seed=espeak_seed)
    if raw.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {utt.text!r} with voice {voice}")
    wave = resample(raw.astype(np.float64) / 32768.0, espeak.sample_rate(), SAMPLE_RATE)
    pad = [np.zeros(int(round(p * SAMPLE_RATE))) for p in pad_seconds]
    speech_power = float(np.mean(wave**2))
    wave = np.concatenate([pad[0], wave, pad[1]])
    if snr_db is not None:  # SNR relative to the speech's power, noise over the whole clip (pads too)
        noise = np.random.default_rng(noise_seed).standard_normal(wave.size)
        wave = wave + noise * math.sqrt(speech_power / 10 ** (snr_db / 10))
    peak = float(np.max(np.abs(wave)))
    if peak > 0.97:
        wave = wave * (0.97 / peak)
    pcm = np.round(wave * 32767.0).astype(np.int16)
    meta = {"kind": KIND, "seed": seed, "split": split, "index": index}
    return SpeechSample(sample_key(split, index), encode_flac(pcm), utt, voice, rate, pitch, snr_db, pcm.size, meta)


def speech_records(seed: int, split: str, index: int, *, noise_prob: float = 0.0) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` per layout (what `write_kind` consumes)."""
    return make_speech_sample(seed, split, index, noise_prob=noise_prob).records()
