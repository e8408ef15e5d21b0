"""`SpeechModality`: Conformer encoder → speech adapter → embeddings of the placeholder span (paper §8.2).

Early fusion: a prompt holds ``<speech_start> <speech> × n <speech_end>`` (`data.prompts.speech_span`,
`n = speech_token_count(frames)`); the adapter's `n` outputs replace the `<speech>` placeholders'
embeddings, the start / end tokens keep trainable rows of their own. No cross-attention.
Groups: `encoder` (the Conformer) and `adapter` (the adapter, plus the three embedding rows).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from mm_llama.adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig
from mm_llama.config import LlamaConfig
from mm_llama.encoders.conformer import ConformerConfig, ConformerEncoder
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities.base import Modality, SpanEmbeddings

__all__ = ["AudioInputs", "SpeechModality"]


class AudioInputs(Protocol):
    """A collated audio batch (see `mm_llama.data.collate.AudioTextBatch`)."""

    features: torch.Tensor  # [B, F_max, 80] log-mel, zero-padded
    feature_lengths: torch.Tensor  # [B] real frames per row


class SpeechModality(Modality):
    """Speech as token embeddings for the `<speech>` placeholders of each row (one utterance per row)."""

    name = "speech"
    adapter_group = "adapter"

    def __init__(self, text: LlamaConfig, encoder: ConformerConfig, adapter: SpeechAdapterConfig) -> None:
        super().__init__(text)
        media = MediaTokens(text.vocab_size)
        self.placeholder = media.speech
        self._ids = (media.speech_start, media.speech_end, media.speech)
        self.encoder_cfg, self.adapter_cfg = encoder, adapter
        self.encoder = ConformerEncoder(encoder)
        self.adapter = SpeechAdapter(adapter, encoder.dim, text.dim)

    def token_ids(self) -> tuple[int, ...]:
        return self._ids

    def groups(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "adapter": self.adapter}

    def encode(self, audio: AudioInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """`(embeddings [B, N, D_lm], lengths [B])`: the adapter outputs of each row's utterance."""
        states, lengths = self.encoder(audio.features, audio.feature_lengths)
        return self.adapter(states, lengths)

    def prepare(self, tokens: torch.Tensor, inputs: AudioInputs | None,
                attention_mask: torch.Tensor | None) -> SpanEmbeddings | None:
        if inputs is None:
            return None
        positions = tokens == self.placeholder  # [B, T]
        embeds, lengths = self.encode(inputs)
        counts = positions.sum(dim=1)
        if counts.shape != lengths.shape or not torch.equal(counts, lengths.to(counts.device)):
            raise ValueError(
                f"the rows hold {counts.tolist()} <speech> placeholder(s) but their audio gives {lengths.tolist()} "
                "adapter output(s); build prompts with speech_span(media, speech_token_count(frames))"
            )
        keep = torch.arange(embeds.shape[1], device=embeds.device)[None] < lengths[:, None]
        return SpanEmbeddings(positions=positions, embeds=embeds[keep])
