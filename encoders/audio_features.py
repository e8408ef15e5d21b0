"""The one place audio becomes model features: 80-dim log-mel filterbanks, 25 ms windows, 10 ms hop."""

from __future__ import annotations

import torch
from torchaudio.compliance.kaldi import fbank

SAMPLE_RATE = 16_000
N_MELS = 80
HOP_MS = 10
FRAMES_PER_SECOND = 1000 // HOP_MS


def log_mel(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono waveform `[S]` (float, about ±1) at 16 kHz → log-mel features `[frames, 80]` (float32).

    Kaldi-compatible (`torchaudio.compliance.kaldi.fbank`, 25 ms Povey window, 10 ms hop, no dither so
    the same audio always gives the same features); 60 s of audio → 5998 frames.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"log_mel expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; resample first")
    if wave.dim() != 1:
        raise ValueError(f"log_mel expects a mono waveform [samples], got shape {tuple(wave.shape)}")
    if wave.numel() < SAMPLE_RATE * 25 // 1000:
        raise ValueError(f"audio of {wave.numel()} samples is shorter than one 25 ms window")
    # kaldi fbank expects 16-bit-scaled samples; scaling keeps the log energies in their usual range
    return fbank(wave.float()[None] * 32768.0, num_mel_bins=N_MELS, sample_frequency=SAMPLE_RATE,
                 frame_length=25.0, frame_shift=float(HOP_MS), dither=0.0, energy_floor=0.0)
