"""Shared by the export tests: a tiny tokenizer with `<|image|>` at the text vocabulary size (as published), a
tiny HF Mllama of that vocabulary saved with it, and transformers' logits on an export with each of its two
known differences from Meta's reference switched on or off:

* `meta_taps`: transformers 5.x collects vision taps *leaving* layer i where Meta takes them *entering*
  it; switching this on points the loaded model's `intermediate_layers_indices` one layer earlier;
* `meta_rows`: transformers keeps the cross-attention output on text rows before the first image (issue
  39379); switching this on zeroes it with a forward hook, as Meta does (`tests.reference.hf_mllama`).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from mm_llama.tokenizer import Tokenizer
from tests.reference.hf_mllama import Images, hf_logits, save_hf_mllama, tiny_hf_mllama

CORPUS = [f"a {c} {s} on the {p}." for c in ("red", "green", "blue", "gold") for s in ("circle", "square", "star")
          for p in ("left", "right", "top")]


def write_tokenizer(directory: Path) -> Tokenizer:
    """A trained byte-level BPE in Llama 3 layout (tokenizer.json + tokenizer.model) in `directory`."""
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny corpus yields fewer merges than asked
        train_llama3_tokenizer(CORPUS * 4, 300, directory)
    return Tokenizer.from_dir(directory)


def write_published_mllama(directory: Path, seed: int = 0) -> tuple[Path, Tokenizer]:
    """A tiny random HF Mllama saved as the released checkpoints are (Meta-meaning taps), whose vocabulary is
    a trained tokenizer's, with that tokenizer's files (`<|image|>` at the text vocabulary size) beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(directory / "tok")
    assert tok.image_id == tok.vocab_size  # as in the published tokenizer.json (128256)
    save_hf_mllama(tiny_hf_mllama(seed, vocab=tok.vocab_size), directory)
    for name in ("tokenizer.json", "tokenizer.model"):
        shutil.copy(directory / "tok" / name, directory / name)
    shutil.rmtree(directory / "tok")
    return directory, tok


def served_logits(hf_model, tokens: torch.Tensor, images: Images, image_id: int, *, meta_taps: bool,
                  meta_rows: bool) -> torch.Tensor:
    """transformers' logits `[B, T, V]` with Meta's tap convention and / or row mask put back."""
    vision = hf_model.model.vision_model
    written = list(vision.intermediate_layers_indices)
    if meta_taps:
        vision.intermediate_layers_indices = [t - 1 for t in written]
    try:
        return hf_logits(hf_model, tokens, images, meta_row_mask=meta_rows, image_token=image_id)
    finally:
        vision.intermediate_layers_indices = written


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
