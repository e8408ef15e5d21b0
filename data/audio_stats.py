"""Per-channel log-mel statistics of a speech corpus: what the Conformer normalises its features with
(stored with the encoder, so inference normalises as training did)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from webdataset.tariterators import tar_file_expander, url_opener

from mm_llama.data.decoders import DecodeError, decode_audio
from mm_llama.data.sample_processors import AUDIO_EXTENSIONS
from mm_llama.data.shard_source import expand_shards
from mm_llama.encoders.audio_features import N_MELS, SAMPLE_RATE, log_mel

__all__ = ["log_mel_stats"]


def log_mel_stats(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                  max_utterances: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(mean [80], std [80], utterances used)` over the frames of the first `max_utterances` decodable
    audio members of `shards`, read in order (undecodable ones are passed over). Raises ValueError when
    no utterance decodes."""
    total = torch.zeros(N_MELS, dtype=torch.float64)
    squares = torch.zeros(N_MELS, dtype=torch.float64)
    frames, used = 0, 0
    for url in expand_shards(shards):
        for member in tar_file_expander(url_opener([{"url": url}]), eof_value=None):
            name = member["fname"]
            if name.rsplit(".", 1)[-1].lower() not in AUDIO_EXTENSIONS:
                continue
            try:
                features = log_mel(decode_audio(member["data"], f"{url}:{name}", SAMPLE_RATE)).double()
            except (DecodeError, ValueError):
                continue
            total += features.sum(0)
            squares += (features * features).sum(0)
            frames += features.shape[0]
            used += 1
            if used >= max_utterances:
                break
        if used >= max_utterances:
            break
    if used == 0:
        raise ValueError(f"no decodable audio in {shards}; the speech encoder's feature statistics need some")
    mean = total / frames
    std = (squares / frames - mean * mean).clamp(min=1e-8).sqrt()
    return mean.float(), std.float(), used
