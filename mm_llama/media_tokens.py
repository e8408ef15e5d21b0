"""Ids of the media tokens the fusion embedding adds after the LM's vocabulary (8 trainable rows).

Row 0 is Meta's `<|image|>` (128256 for Llama 3); the others are mm-llama's for the parts Meta never
released. They are model inputs only: the output head keeps the LM's vocabulary, so labels at these
positions are always −100.
"""

from __future__ import annotations

from dataclasses import dataclass


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
