"""Tokenizer files laid out the three ways users bring them, made from a tiny trained BPE by editing the files
directly (independently of mm_llama's tokenizer writer):

* ``llama-3.2-vision-json``: HF ``tokenizer.json`` whose added tokens end with ``<|image|>`` at the text
  vocabulary size, as in the published Llama 3.2 Vision repositories (128256 there);
* ``meta-tiktoken``: Meta's ``tokenizer.model`` (base ranks only; the loader defines the specials, and
  ``<|image|>`` at the text vocabulary size as Meta's and torchtune's Llama 3.2 Vision tokenizers do);
* ``llama-3.1-json``: a text-only ``tokenizer.json`` with no ``<|image|>`` at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

VARIANTS = ("llama-3.2-vision-json", "meta-tiktoken", "llama-3.1-json")

# The entry as it stands in the published Llama 3.2 Vision tokenizer.json (there with "id": 128256).
PUBLISHED_IMAGE_ENTRY = {"content": "<|image|>", "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True}


def text_only_spec(tokenizer_json: Path) -> dict:
    """The tokenizer.json of `tokenizer_json` with any `<|image|>` added token removed."""
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|image|>"]
    return spec


def text_vocab_size(spec: dict) -> int:
    """One past the highest id of the base vocabulary and the added tokens."""
    return 1 + max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])])


def write_tokenizer_variant(trained_dir: Path, out_dir: Path, variant: str) -> Path:
    """Put the `variant` tokenizer made from `trained_dir` (tokenizer.json + tokenizer.model) into `out_dir`."""
    for name in ("tokenizer.json", "tokenizer.model"):
        (out_dir / name).unlink(missing_ok=True)
    if variant == "meta-tiktoken":
        shutil.copy(trained_dir / "tokenizer.model", out_dir / "tokenizer.model")
        return out_dir
    spec = text_only_spec(trained_dir / "tokenizer.json")
    if variant == "llama-3.2-vision-json":
        spec["added_tokens"].append({"id": text_vocab_size(spec), **PUBLISHED_IMAGE_ENTRY})
    elif variant != "llama-3.1-json":
        raise ValueError(f"unknown tokenizer variant {variant!r}; expected one of {VARIANTS}")
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return out_dir
