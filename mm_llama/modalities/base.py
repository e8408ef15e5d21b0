"""What a modality is to `MultimodalLlama`: a named module that turns its batch inputs into something the
frozen LM reads, either cross-attention inputs (deep fusion: image, video) or embeddings for a token span
(early fusion: speech).

The model owns the wiring: it puts each deep-fusion modality's blocks into the decoder layers the
modality names (`layers.i.fusion.<name>.*`), gives each modality its own embedding rows for the media ids
it owns (`tok_embeddings.media.<name>.weight`) and derives trainable group names `<name>.<group>` from
`groups()` (the blocks and embedding rows join `<name>.<adapter_group>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm_llama.adapters.cross_attention import GatedCrossAttentionBlock
from mm_llama.config import LlamaConfig
from mm_llama.fusion import CrossAttentionInputs

RESERVED_NAMES = ("decoder",)  # the LM's own group; no modality may take its name


@dataclass
class SpanEmbeddings:
    """Early-fusion output: `embeds [N, D]` replace the token embeddings at the `N` True entries of
    `positions [B, T]`, in row-major order."""

    positions: torch.Tensor
    embeds: torch.Tensor


class Modality(nn.Module):
    """Base class of the modalities a `MultimodalLlama` composes.

    Subclasses set `name` (also the prefix of their state-dict keys and group names) and implement
    `token_ids`, `groups` and `prepare`. A deep-fusion modality sets `fusion_layers` (decoder layers it
    adds a cross-attention block before) and may override `new_block`; an early-fusion one leaves
    `fusion_layers` empty and returns `SpanEmbeddings` from `prepare`.
    """

    name: str = ""
    adapter_group: str = "fusion"  # the group its cross-attention blocks and embedding rows belong to
    fusion_rank: int = 1  # at a layer several modalities share, lower ranks' blocks run first (video before image)
    borrows: tuple[str, ...] = ()  # modalities whose weights this one computes with (exported along with it)

    def __init__(self, text: LlamaConfig, fusion_layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        if not self.name or not self.name.isidentifier() or self.name in RESERVED_NAMES:
            raise ValueError(f"{type(self).__name__}.name must be a Python identifier other than "
                             f"{list(RESERVED_NAMES)}, got {self.name!r}")
        bad = [i for i in fusion_layers if not 0 <= i < text.n_layers]
        if bad:
            raise ValueError(f"{self.name}: fusion layer indices {bad} are outside the decoder's 0..{text.n_layers - 1}")
        self.text_cfg = text
        self.fusion_layers = tuple(fusion_layers)

    def token_ids(self) -> tuple[int, ...]:
        """The media ids this modality puts in the text (each gets a trainable embedding row)."""
        raise NotImplementedError

    def groups(self) -> dict[str, nn.Module]:
        """This module's own parts by group name (`{"encoder": self.encoder, "fusion": self.projector}`);
        every parameter of the modality must be in one of them."""
        raise NotImplementedError

    def new_block(self) -> nn.Module:
        """A cross-attention block for one of `fusion_layers` (deep fusion only)."""
        return GatedCrossAttentionBlock(self.text_cfg)

    def prepare(self, tokens: torch.Tensor, inputs: Any,
                attention_mask: torch.Tensor | None) -> CrossAttentionInputs | SpanEmbeddings | None:
        """`tokens [B, T]` and this modality's collated batch inputs → cross-attention inputs (with
        `decode_keys` set) or span embeddings; None when the inputs hold no real media."""
        raise NotImplementedError


__all__ = ["Modality", "RESERVED_NAMES", "SpanEmbeddings"]
