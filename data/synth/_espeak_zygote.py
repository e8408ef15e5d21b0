"""Helper process for `espeak.py`: a pristine libespeak-ng that forks one child per utterance.

libespeak-ng keeps state from one utterance to the next in function-level statics that neither
``espeak_Terminate`` nor ``espeak_Initialize`` resets (the pitch-flutter index, the wave generator's
phase and gain, ...), so the same request gives different samples depending on what was spoken before.
This process loads and initialises the library once and never synthesises itself; each request is
served by a forked child that starts from exactly that initial state, seeds espeak-ng's two random
generators (its own and libc's ``rand``, used for breath noise), synthesises and exits. Same request →
same samples, in any order, in any process.

Standard library only (it starts fast). Protocol on stdin/stdout (binary):
    startup:  one JSON line ``{"sample_rate": N}`` or ``{"error": "..."}``
    request:  one JSON line ``{"text", "voice", "rate", "pitch", "range", "volume", "word_gap", "seed"}``
    response: one JSON line ``{"ok": true, "nbytes": K}`` followed by K bytes of int16 samples
              (native byte order), or ``{"ok": false, "error": "..."}``.
Run as ``python -I _espeak_zygote.py LIBRARY_PATH DATA_PATH``.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000
PARAMS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "word_gap": 7}
POS_CHARACTER = 1
CHARS_UTF8 = 1

_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _load(lib_path: str, data_path: str) -> tuple[ctypes.CDLL, int, list[bytes], object]:
    lib = ctypes.CDLL(lib_path)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_Callback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data path {data_path}")
    chunks: list[bytes] = []

    def on_audio(wav: ctypes._Pointer, n: int, events: int) -> int:
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    callback = _Callback(on_audio)
    lib.espeak_SetSynthCallback(callback)
    return lib, rate, chunks, callback


def _synthesise(lib: ctypes.CDLL, chunks: list[bytes], req: dict) -> bytes:
    """Runs in the forked child: returns the response (header line + samples)."""
    libc = ctypes.CDLL(None)
    seed = int(req.get("seed", 0)) & 0x7FFFFFFF
    if lib.espeak_SetVoiceByName(str(req["voice"]).encode()) != 0:
        return json.dumps({"ok": False, "error": f"espeak-ng could not select voice {req['voice']!r}"}).encode() + b"\n"
    for name, param in PARAMS.items():
        if name in req:
            lib.espeak_SetParameter(param, int(req[name]), 0)
    lib.espeak_ng_SetRandSeed(seed)
    libc.srand(seed)
    text = str(req["text"]).encode("utf-8") + b"\0"
    err = lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
    if err != 0:
        return json.dumps({"ok": False, "error": f"espeak_Synth failed with error {err}"}).encode() + b"\n"
    lib.espeak_Synchronize()
    audio = b"".join(chunks)
    return json.dumps({"ok": True, "nbytes": len(audio)}).encode() + b"\n" + audio


def _serve(lib: ctypes.CDLL, chunks: list[bytes]) -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        try:
            req = json.loads(line)
        except ValueError as e:
            stdout.write(json.dumps({"ok": False, "error": f"bad request: {e}"}).encode() + b"\n")
            stdout.flush()
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: pristine library state
            os.close(r)
            try:
                payload = _synthesise(lib, chunks, req)
            except BaseException as e:  # noqa: BLE001 - report anything to the parent
                payload = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode() + b"\n"
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
            os._exit(0)
        os.close(w)
        parts = []
        while True:
            block = os.read(r, 1 << 20)
            if not block:
                break
            parts.append(block)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        payload = b"".join(parts)
        if status != 0 or b"\n" not in payload:
            payload = json.dumps({"ok": False, "error": f"synthesis process died (status {status})"}).encode() + b"\n"
        stdout.write(payload)
        stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: _espeak_zygote.py LIBRARY_PATH DATA_PATH\n")
        return 2
    try:
        lib, rate, chunks, _callback = _load(argv[0], argv[1])
    except Exception as e:  # noqa: BLE001 - reported to the client
        sys.stdout.buffer.write(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        sys.stdout.buffer.flush()
        return 1
    sys.stdout.buffer.write(json.dumps({"sample_rate": rate}).encode() + b"\n")
    sys.stdout.buffer.flush()
    _serve(lib, chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
