"""Ids of the media tokens the fusion embedding adds after the LM's vocabulary (8 trainable rows).

Row 0 is Meta's `<|image|>` (128256 for Llama 3); the others are mm-llama's for the parts Meta never
released. They are model inputs only: the output head keeps the LM's vocabulary, so labels at these
positions are always −100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mm_llama.tokenizer import Tokenizer


@dataclass(frozen=True)
class MediaTokens:
    """Media token ids for an LM whose vocabulary has `vocab_size` entries."""

    vocab_size: int

    @property
    def image(self) -> int:
        return self.vocab_size

    @property
    def video(self) -> int:
        return self.vocab_size + 1

    @property
    def speech_start(self) -> int:
        return self.vocab_size + 2

    @property
    def speech_end(self) -> int:
        return self.vocab_size + 3

    @property
    def speech(self) -> int:
        """Placeholder filling the span between `speech_start` and `speech_end`; replaced by adapter outputs."""
        return self.vocab_size + 4

    def all(self) -> frozenset[int]:
        return frozenset({self.image, self.video, self.speech_start, self.speech_end, self.speech})

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise ValueError unless `tokenizer`'s text ids all lie below these media ids and the `<|image|>` it
        may list (Llama 3.2 Vision's tokenizer.json, Meta's tiktoken convention) is this model's image id."""
        if self.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"media token ids start at {self.vocab_size} but the tokenizer's text vocabulary uses ids up to "
                f"{tokenizer.vocab_size - 1}; build MediaTokens with the LM's vocabulary size (>= {tokenizer.vocab_size})"
            )
        if tokenizer.image_id is not None and tokenizer.image_id != self.image:
            raise ValueError(
                f"the tokenizer ({tokenizer.source}) lists <|image|> as id {tokenizer.image_id} but the model's image "
                f"token is {self.image} (its text vocabulary size); use the tokenizer that belongs to this model"
            )
