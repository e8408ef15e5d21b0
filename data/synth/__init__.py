"""Synthetic data for the built-in default: shapes, glyphs and objects images, moving-shapes clips, speech and text.

All kinds share one grammar (`grammar`), are deterministic for a seed and split, and keep splits
disjoint by content (`splits`). `write_synth` writes any kind as webdataset shards through
`mm_llama.data.shard_writer.ShardWriter`; the folder layout is documented in `write`.

Public API:
    write_synth, KINDS, SynthSummary           write a kind's shards (what `mm-llama synth` runs)
    make_shapes_sample, make_glyphs_sample, make_moving_shapes_sample, make_speech_sample,
    make_text_sample
                                               one sample as Python objects (bytes + metadata)
    grammar, splits, espeak                    the shared grammar, seeding/splits, espeak-ng binding
"""

from mm_llama.data.synth import grammar, splits
from mm_llama.data.synth.glyphs import make_glyphs_sample
from mm_llama.data.synth.moving_shapes import make_moving_shapes_sample
from mm_llama.data.synth.shapes import make_shapes_sample
from mm_llama.data.synth.speech import make_speech_sample, split_voices
from mm_llama.data.synth.splits import SPLITS, split_of
from mm_llama.data.synth.text import make_text_sample, read_corpus
from mm_llama.data.synth.write import KINDS, SynthSummary, summary_path, write_synth

__all__ = [
    "KINDS",
    "SPLITS",
    "SynthSummary",
    "grammar",
    "make_glyphs_sample",
    "make_moving_shapes_sample",
    "make_shapes_sample",
    "make_speech_sample",
    "make_text_sample",
    "read_corpus",
    "split_of",
    "split_voices",
    "splits",
    "summary_path",
    "write_synth",
]
