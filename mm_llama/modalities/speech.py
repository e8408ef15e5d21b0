"""`SpeechModality`: Conformer encoder → speech adapter → embeddings of the placeholder span (paper §8.2).

Early fusion: a prompt holds ``<speech_start> <speech> × n <speech_end>`` (`data.prompts.speech_span`,
`n = speech_token_count(frames)`); the adapter's `n` outputs replace the `<speech>` placeholders'
embeddings, the start / end tokens keep trainable rows of their own. No cross-attention.
Groups: `encoder` (the Conformer) and `adapter` (the adapter, plus the three embedding rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import nn

from mm_llama.adapters.speech_adapter import SPEECH_ADAPTER_PRESETS, SpeechAdapter, SpeechAdapterConfig
from mm_llama.config import LlamaConfig
from mm_llama.encoders.conformer import CONFORMER_PRESETS, ConformerConfig, ConformerEncoder
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities.base import Modality, SpanEmbeddings

__all__ = ["AudioInputs", "EncodedSpeech", "SpeechModality", "speech_config_fields", "speech_configs"]


class AudioInputs(Protocol):
    """A collated audio batch (see `mm_llama.data.collate.AudioTextBatch`)."""

    features: torch.Tensor  # [B, F_max, 80] log-mel, zero-padded
    feature_lengths: torch.Tensor  # [B] real frames per row


@dataclasses.dataclass(frozen=True)
class EncodedSpeech:
    """What `SpeechModality.encode` gave for a batch, passed back as its media so it is not computed twice
    (a training step that also scores the adapter outputs, `mm_llama.train.speech_ctc`)."""

    embeds: torch.Tensor  # [B, N, D_lm]
    lengths: torch.Tensor  # [B] real outputs per row


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

    def prepare(self, tokens: torch.Tensor, inputs: AudioInputs | EncodedSpeech | None,
                attention_mask: torch.Tensor | None) -> SpanEmbeddings | None:
        if inputs is None:
            return None
        positions = tokens == self.placeholder  # [B, T]
        embeds, lengths = (inputs.embeds, inputs.lengths) if isinstance(inputs, EncodedSpeech) else self.encode(inputs)
        counts = positions.sum(dim=1)
        if counts.shape != lengths.shape or not torch.equal(counts, lengths.to(counts.device)):
            raise ValueError(
                f"the rows hold {counts.tolist()} <speech> placeholder(s) but their audio gives {lengths.tolist()} "
                "adapter output(s); build prompts with speech_span(media, speech_token_count(frames))"
            )
        keep = torch.arange(embeds.shape[1], device=embeds.device)[None] < lengths[:, None]
        return SpanEmbeddings(positions=positions, embeds=embeds[keep])


def _config_from(value: Any, presets: dict[str, Any], cls: type, what: str) -> Any:
    """A preset name, or a mapping of fields with an optional `preset` to start from."""
    if value is None:
        value = "tiny"
    if isinstance(value, str):
        if value not in presets:
            raise ValueError(f"{what}: unknown preset {value!r}; presets: {sorted(presets)}")
        return presets[value]
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a preset name or a mapping of {cls.__name__} fields, got {value!r}")
    fields = dict(value)
    base = presets[fields.pop("preset")] if "preset" in fields else cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; {cls.__name__} has {sorted(known)} (plus 'preset')")
    return dataclasses.replace(base, **fields)


def speech_configs(fields: dict[str, Any]) -> tuple[ConformerConfig, SpeechAdapterConfig]:
    """`{encoder: PRESET | {fields}, adapter: PRESET | {fields}}` (a recipe's `model.speech`; both default
    to `tiny`) → the encoder and adapter configs. (`encoder_checkpoint`, `best_rq` and `ctc` are the stages'.)"""
    unknown = sorted(set(fields) - {"encoder", "adapter", "encoder_checkpoint", "best_rq", "ctc"})
    if unknown:
        raise ValueError(f"model.speech: unknown key(s) {unknown}; it takes encoder, adapter, encoder_checkpoint, "
                         "best_rq and ctc")
    return (_config_from(fields.get("encoder"), CONFORMER_PRESETS, ConformerConfig, "model.speech.encoder"),
            _config_from(fields.get("adapter"), SPEECH_ADAPTER_PRESETS, SpeechAdapterConfig, "model.speech.adapter"))


def speech_config_fields(modality: SpeechModality) -> dict[str, Any]:
    """The `model.speech` mapping that rebuilds `modality` (what a run directory records)."""
    return {"encoder": dataclasses.asdict(modality.encoder_cfg), "adapter": dataclasses.asdict(modality.adapter_cfg)}
