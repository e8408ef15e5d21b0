"""espeak-ng through ctypes, from the ``espeakng-loader`` wheel (no system package), deterministically.

libespeak-ng has process-global state (one voice, one parameter set, one callback) and, worse, keeps
state from one utterance to the next in statics that no API call resets (pitch-flutter index, wave
phase, gain), so the same text spoken twice in one process gives different samples. For byte-identical
synthetic data this module owns **one process-wide helper** (`_espeak_zygote.py`, started on first use):
it loads and initialises libespeak-ng once through ctypes and forks a child per utterance, so every
utterance starts from the same pristine state and seeds espeak-ng's random generators (breath noise)
from the request. Calls from several threads are serialised by a lock; a forked client process starts
its own helper. Needs ``os.fork`` (Linux, macOS).

Voices are written ``LANGUAGE+VARIANT`` (``"en-us+f3"``): ``LANGUAGE`` is a voice file under
``espeak-ng-data/lang`` (matched case-insensitively by file name, e.g. ``en-gb-x-rp``) and ``VARIANT`` a
file under ``espeak-ng-data/voices/!v`` (``m1``…``m8``, ``f1``…``f5`` and named ones). Both are checked
against the bundled data before use, because libespeak-ng silently ignores an unknown variant.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

RATE_RANGE = (80, 450)
"""Words per minute that libespeak-ng accepts."""

_ZYGOTE = Path(__file__).with_name("_espeak_zygote.py")
_LOCK = threading.Lock()
_HELPER: "_Helper | None" = None


def _paths() -> tuple[str, Path]:
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("speech synthesis needs the espeakng-loader wheel: pip install espeakng-loader") from e
    return espeakng_loader.get_library_path(), Path(espeakng_loader.get_data_path())


class _Helper:
    """The helper process and its pipes (one per client process)."""

    def __init__(self) -> None:
        if not hasattr(os, "fork"):
            raise RuntimeError("deterministic espeak-ng synthesis needs os.fork (Linux or macOS)")
        lib_path, data_path = _paths()
        if not os.path.exists(lib_path) or not data_path.is_dir():
            raise RuntimeError(f"espeakng-loader's library {lib_path} or data {data_path} is missing; reinstall it")
        self.pid = os.getpid()
        self.broken = False
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(_ZYGOTE), lib_path, str(data_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # stderr inherited: espeak-ng warnings stay visible
        )
        hello = self._read_header()
        if "sample_rate" not in hello:
            self.close()
            raise RuntimeError(f"espeak-ng failed to start: {hello.get('error', hello)}")
        self.sample_rate = int(hello["sample_rate"])

    def _read_header(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the espeak-ng helper process exited unexpectedly (its error is on stderr above)")
        return json.loads(line)

    def request(self, req: dict) -> bytes:
        """Send one request and return the int16 sample bytes. If the exchange breaks half-way
        (interrupt, dead helper) the helper is stopped, so the next call starts a fresh one in sync."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            head = self._read_header()
            data = self.proc.stdout.read(int(head["nbytes"])) if head.get("ok") else b""
        except BaseException:
            self.broken = True
            self.proc.kill()
            self.close()
            raise
        if not head.get("ok"):
            raise RuntimeError(f"espeak-ng failed for {req['text']!r} with voice {req['voice']}: {head.get('error')}")
        if len(data) != int(head["nbytes"]):
            self.broken = True
            raise RuntimeError("the espeak-ng helper process sent a truncated response")
        return data

    def alive(self) -> bool:
        return not self.broken and self.pid == os.getpid() and self.proc.poll() is None

    def close(self) -> None:
        """Close the pipes (the helper exits on end of input) and reap it."""
        if self.pid != os.getpid():
            return  # a forked copy: the helper belongs to the parent
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _helper() -> _Helper:
    """The process-wide helper, started on first use (caller holds `_LOCK`)."""
    global _HELPER
    if _HELPER is None or not _HELPER.alive():
        _HELPER = _Helper()
    return _HELPER


@atexit.register
def shutdown() -> None:
    """Stop the helper process (also runs at interpreter exit); the next call starts a new one."""
    global _HELPER
    with _LOCK:
        if _HELPER is not None:
            _HELPER.close()
            _HELPER = None


def sample_rate() -> int:
    """The rate (Hz) of `synthesize`'s output (libespeak-ng's native rate, normally 22050)."""
    with _LOCK:
        return _helper().sample_rate


@lru_cache(maxsize=None)
def languages(prefix: str = "en") -> tuple[str, ...]:
    """Bundled language voices whose file name starts with ``prefix`` (lowercased, sorted).

    For English this is ``en``, ``en-029``, ``en-gb-scotland``, ``en-gb-x-gbclan``, ``en-gb-x-gbcwmd``,
    ``en-gb-x-rp``, ``en-shaw``, ``en-us``, ``en-us-nyc`` in espeakng-loader 0.2.x.
    """
    _, data = _paths()
    names = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    return tuple(sorted(n for n in names if n == prefix or n.startswith(prefix + "-")))


@lru_cache(maxsize=None)
def variants() -> tuple[str, ...]:
    """Bundled voice variants (files of ``espeak-ng-data/voices/!v``), sorted."""
    _, data = _paths()
    return tuple(sorted(p.name for p in (data / "voices" / "!v").iterdir() if p.is_file()))


def check_voice(voice: str) -> str:
    """Return ``voice`` (``LANGUAGE`` or ``LANGUAGE+VARIANT``) if the bundled data has it, else raise
    ``ValueError`` listing what exists."""
    language, _, variant = voice.partition("+")
    lang_prefix = language.split("-")[0]
    if language.lower() not in languages(lang_prefix):
        raise ValueError(f"espeak-ng has no language voice {language!r}; available: {', '.join(languages(lang_prefix)) or 'none'}")
    if variant and variant not in variants():
        raise ValueError(f"espeak-ng has no voice variant {variant!r}; available: {', '.join(variants())}")
    return voice


def synthesize(text: str, voice: str, *, rate: int = 175, pitch: int = 50, pitch_range: int = 50,
               word_gap: int = 0, seed: int = 0) -> np.ndarray:
    """Speak ``text`` and return int16 mono samples ``[N]`` at `sample_rate`.

    The result depends only on the arguments (not on earlier calls, threads or processes).

    Args:
        text: UTF-8 text (plain, not SSML).
        voice: ``LANGUAGE[+VARIANT]``, e.g. ``"en-us+f3"`` (checked by `check_voice`).
        rate: words per minute, 80–450.
        pitch: base pitch 0–100 (50 = the voice's normal pitch).
        pitch_range: pitch variation 0–100 (0 = monotone).
        word_gap: extra pause between words in units of 10 ms at the default speed.
        seed: seed of espeak-ng's random generators (breath noise of some variants).
    """
    if not text.strip():
        raise ValueError("cannot synthesise empty text")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(f"rate must be {RATE_RANGE[0]}-{RATE_RANGE[1]} words per minute, got {rate}")
    for name, value in (("pitch", pitch), ("pitch_range", pitch_range)):
        if not 0 <= value <= 100:
            raise ValueError(f"{name} must be 0-100, got {value}")
    if word_gap < 0:
        raise ValueError(f"word_gap must be >= 0, got {word_gap}")
    check_voice(voice)
    req = {"text": text, "voice": voice, "rate": int(rate), "pitch": int(pitch), "range": int(pitch_range),
           "volume": 100, "word_gap": int(word_gap), "seed": int(seed)}
    with _LOCK:
        data = _helper().request(req)
    return np.frombuffer(data, dtype=np.int16).copy()
