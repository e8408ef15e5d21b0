"""Transcription (ASR) and speech translation (AST) over a `MultimodalLlama` with a speech modality
(what `transcribe` / `translate` run).

Each file is decoded with soundfile (any rate, resampled to 16 kHz; stereo mixed down), cut into windows
the model can hold (at most 60 s, the paper's crop, and short enough that the `<speech>` span, the prompt
and the answer fit the LM's `max_seq_len`), turned into log-mel features, prompted with the same template
training uses (`data.prompts.prompt_ids`, task `asr` / `ast`) and decoded greedily by default; the texts
of a file's windows are joined with spaces. A file that cannot be read is reported, the others still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mm_llama.adapters.speech_adapter import speech_token_count
from mm_llama.data.collate import AudioBatch, collate_audio_only
from mm_llama.data.decoders import DecodeError, decode_audio
from mm_llama.data.prompts import prompt_ids
from mm_llama.encoders.audio_features import FRAMES_PER_SECOND, SAMPLE_RATE, log_mel
from mm_llama.generation import GenerationConfig, generate
from mm_llama.media_tokens import MediaTokens
from mm_llama.multimodal import MultimodalLlama
from mm_llama.tokenizer import Tokenizer

__all__ = ["MAX_WINDOW_SECONDS", "SpeechAnswer", "answer_speech", "read_audio", "speech_batch", "speech_window_frames"]

MAX_WINDOW_SECONDS = 60.0  # the paper's training crop


@dataclass
class SpeechAnswer:
    """One file's result: the text (windows joined), or the reason the file could not be used."""

    source: str
    text: str | None = None
    error: str | None = None
    windows: int = 0


def _fields(task: str, language: str, n_speech_tokens: int) -> dict[str, object]:
    key = "language" if task == "asr" else "target_language"
    return {key: language, "n_speech_tokens": n_speech_tokens}


def speech_window_frames(model: MultimodalLlama, tokenizer: Tokenizer, task: str, language: str,
                         max_new_tokens: int) -> int:
    """The longest window (in 10 ms frames, ≤ 60 s) whose prompt plus `max_new_tokens` fits `max_seq_len`."""
    media = MediaTokens(model.text_cfg.vocab_size)
    overhead = len(prompt_ids(tokenizer, media, task, _fields(task, language, 1))) - 1  # all but the span
    budget = model.max_seq_len - overhead - max_new_tokens
    if budget < 1:
        raise ValueError(f"the model's max_seq_len {model.max_seq_len} leaves no room for speech after the "
                         f"{overhead}-token prompt and {max_new_tokens} new tokens; lower max_new_tokens")
    frames = min(int(MAX_WINDOW_SECONDS * FRAMES_PER_SECOND), budget * 8)  # 8 frames (80 ms) per span token
    while speech_token_count(frames) > budget:
        frames -= 1
    return frames


def read_audio(path: str | Path) -> torch.Tensor:
    """16 kHz mono waveform of a file; ValueError saying why it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the file ({err.strerror or err})") from None
    try:
        return decode_audio(data, str(path), SAMPLE_RATE)
    except DecodeError as err:
        raise ValueError(str(err)) from None


def speech_batch(model: MultimodalLlama, features: Sequence[torch.Tensor]) -> AudioBatch:
    """`[frames, 80]` log-mel features of each clip → a padded `AudioBatch` on the speech modality's device
    and dtype."""
    dtype = next(model.speech.parameters()).dtype
    return collate_audio_only([(None, f) for f in features]).to(next(model.parameters()).device, dtype=dtype)


def answer_speech(model: MultimodalLlama, tokenizer: Tokenizer, files: Sequence[str | Path], gen: GenerationConfig,
                  *, task: str = "asr", language: str = "English", batch_size: int = 8) -> list[SpeechAnswer]:
    """Transcribe (`asr`, `language` = the speech's) or translate (`ast`, `language` = the target) each file."""
    if task not in ("asr", "ast"):
        raise ValueError(f"task must be 'asr' or 'ast', got {task!r}")
    media = MediaTokens(model.text_cfg.vocab_size)
    window = speech_window_frames(model, tokenizer, task, language, gen.max_new_tokens)
    samples_per_frame = SAMPLE_RATE // FRAMES_PER_SECOND
    results = [SpeechAnswer(source=str(f)) for f in files]
    jobs: list[tuple[int, torch.Tensor]] = []  # (file index, features of one window)
    for i, path in enumerate(files):
        try:
            wave = read_audio(path)
            pieces = [wave[start:start + window * samples_per_frame]
                      for start in range(0, wave.numel(), window * samples_per_frame)]
            features = [log_mel(p) for p in pieces if p.numel() >= SAMPLE_RATE * 25 // 1000]  # ≥ one 25 ms frame
            if not features:
                raise ValueError("the audio is shorter than one 25 ms frame")
        except ValueError as err:
            results[i].error = str(err)
            continue
        jobs += [(i, f) for f in features]
    texts: dict[int, list[str]] = {}
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, media, task, _fields(task, language, speech_token_count(int(f.shape[0]))))
                   for _, f in batch]
        audio = speech_batch(model, [f for _, f in batch])
        outputs = generate(model, prompts, gen, prefill_inputs={"media": {"speech": audio}})
        for (i, _), out in zip(batch, outputs):
            texts.setdefault(i, []).append(tokenizer.decode(out.tokens).strip())
    for i, parts in texts.items():
        results[i].text = " ".join(p for p in parts if p)
        results[i].windows = len(parts)
    return results
