"""The CTC aid of the speech stage: a direct signal that tells the encoder where each word is.

Through a frozen LM, the only signal the speech encoder and adapter get is the answer's cross-entropy, and
through a tiny frozen LM that gradient is too weak to place the words (stop 30: the transcript loss stays at
the LM's text prior, WER near 90 %). The aid scores the adapter's outputs `[B, N, D]` (the embeddings that
replace the speech placeholders) against the LM's own input-embedding table with CTC: each output's logits
over the vocabulary are ``scale × cos(output, row)``, the targets are the transcript's tokens (the answer
the sample is labelled with), and the blank is a token of the vocabulary (``blank``). Its loss is added to
the answer loss with ``weight``. A speech span then holds each word's embedding where the word is heard and
the blank token's elsewhere — the layout of the stretched ASR exchanges an LM can be taught to read
(`mm_llama.data.synth.speech_span_text`). The architecture is unchanged; the aid only adds a loss.

Recipe: ``model.speech.ctc: {blank: "<|reserved_special_token_10|>", weight: 1.0, scale: 30.0}`` (absent:
no aid, as in the paper recipes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.tokenizer import Tokenizer

__all__ = ["SpeechCtc", "embedding_ctc_loss", "response_targets", "speech_ctc_from"]


@dataclass(frozen=True)
class SpeechCtc:
    """The aid's settings, the blank resolved to its id (see the module docstring)."""

    blank_id: int
    weight: float = 1.0
    scale: float = 30.0


def speech_ctc_from(fields: Mapping[str, Any] | None, tokenizer: Tokenizer) -> SpeechCtc | None:
    """`model.speech.ctc` (None / absent: no aid) with its ``blank`` (a special token's text, or an id)
    looked up in ``tokenizer``; ValueError names what is wrong."""
    if fields is None:
        return None
    if not isinstance(fields, Mapping):
        raise ValueError(f"model.speech.ctc must be a mapping with blank, weight and scale, got {fields!r}")
    unknown = sorted(set(fields) - {"blank", "weight", "scale"})
    if unknown:
        raise ValueError(f"model.speech.ctc: unknown key(s) {unknown}; it takes blank, weight and scale")
    blank = fields.get("blank")
    if isinstance(blank, str):
        blank_id = tokenizer.special_tokens.get(blank)
        if blank_id is None:
            raise ValueError(f"model.speech.ctc.blank {blank!r} is not a special token of the tokenizer "
                             f"({tokenizer.source}); name one, e.g. '<|reserved_special_token_10|>'")
    elif isinstance(blank, int) and not isinstance(blank, bool) and 0 <= blank < tokenizer.vocab_size:
        blank_id = blank
    else:
        raise ValueError(f"model.speech.ctc.blank must be a special token's text or a token id below "
                         f"{tokenizer.vocab_size}, got {blank!r}")
    out = SpeechCtc(blank_id, **{k: fields[k] for k in ("weight", "scale") if k in fields})
    for name in ("weight", "scale"):
        value = getattr(out, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"model.speech.ctc.{name} must be a positive number, got {value!r}")
    return out


def response_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CTC targets of aligned `labels [B, T]` (−100 outside the answer): each row's labelled tokens
    without the last one (the closing ``<|eot_id|>``), left-aligned → `(targets [B, L] (0-padded),
    lengths [B])`."""
    labelled = labels != IGNORE_INDEX
    lengths = (labelled.sum(dim=1) - 1).clamp(min=0)
    order = torch.cumsum(labelled, dim=1) - 1  # the index of each labelled token within its row
    keep = labelled & (order < lengths[:, None])
    targets = torch.zeros(labels.shape[0], max(int(lengths.max()), 1) if labels.numel() else 1,
                          dtype=torch.long, device=labels.device)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    targets[rows[keep], order[keep]] = labels[keep]
    return targets, lengths


def embedding_ctc_loss(embeds: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                       target_lengths: torch.Tensor, *, blank: int, scale: float) -> torch.Tensor:
    """CTC of `embeds [B, N, D]` (rows valid up to `lengths [B]`) against `table [V, D]`: logits
    ``scale × cos(embeds, table)`` `[B, N, V]`, blank id ``blank``, `targets [B, L]` valid up to
    `target_lengths [B]`. Summed over the batch (fp32); a row its outputs cannot align counts 0."""
    logits = scale * F.normalize(embeds.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)  # [N, B, V]
    return F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=blank, reduction="sum", zero_infinity=True)
