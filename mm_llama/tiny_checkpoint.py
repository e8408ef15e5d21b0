"""Write a tiny *random* Llama 3 checkpoint with a trained BPE tokenizer (for `make demo` and smoke tests).

`python -m mm_llama.tiny_checkpoint OUT_DIR` — the weights are random, so generated text is noise; it
shows that set-up, checkpoint loading, tokenisation and generation work end to end on any machine.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from mm_llama.checkpoints import save_hf
from mm_llama.config import preset
from mm_llama.model import LlamaDecoder
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
_SHAPES = ["circle", "square", "triangle", "star"]
_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]


def sample_sentences() -> list[str]:
    """A small built-in corpus so the tokenizer has words to learn."""
    return [f"A {c} {s} is {p}." for c, s, p in itertools.product(_COLOURS, _SHAPES, _PLACES)]


def write_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0, base_vocab: int = 320) -> Path:
    """HF-layout checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer.model) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small corpus yields fewer merges than asked; that is fine here
        train_llama3_tokenizer(sample_sentences(), base_vocab, tmp)
        for name in ("tokenizer.json", "tokenizer.model"):
            shutil.copy(Path(tmp) / name, out / name)
    tokenizer = Tokenizer.from_dir(out)
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = LlamaDecoder(cfg)
    save_hf(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote a tiny random Llama 3 checkpoint to {write_tiny_checkpoint(args.out_dir, seed=args.seed)}")


if __name__ == "__main__":
    main()
