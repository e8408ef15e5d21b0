"""torchaudio's native extension loads beside the pinned torch, and `log_mel` computes a real filterbank.

A torchaudio release built against a newer torch (2.11.1 beside torch 2.11.0) fails right here, at
import, instead of in users' hands."""

from __future__ import annotations

import math

import torch

from mm_llama.encoders.audio_features import N_MELS, SAMPLE_RATE, log_mel


def test_torchaudio_native_extension_loads() -> None:
    from torchaudio import _extension

    assert _extension._IS_TORCHAUDIO_EXT_AVAILABLE
    assert isinstance(torch.ops._torchaudio.is_align_available(), bool)  # an op from libtorchaudio itself


def _kaldi_mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


def test_log_mel_puts_a_tone_in_its_mel_bin() -> None:
    hz = 1000.0
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE  # one second
    feats = log_mel(0.5 * torch.sin(2 * math.pi * hz * t))
    # 25 ms windows (400 samples) every 10 ms (160), whole windows only
    assert feats.shape == (1 + (SAMPLE_RATE - 400) // 160, N_MELS) and feats.dtype == torch.float32
    # Kaldi's bins are equally spaced on its mel scale between 20 Hz and Nyquist; bin i is centred at
    # low + (i + 1) * step. The tone's energy peaks in the bin whose centre is nearest to it.
    low, high = _kaldi_mel(20.0), _kaldi_mel(SAMPLE_RATE / 2)
    step = (high - low) / (N_MELS + 1)
    expected = round((_kaldi_mel(hz) - low) / step - 1)
    assert abs(int(feats.mean(0).argmax()) - expected) <= 1
    assert torch.isfinite(feats).all()
