"""Tiny valid checkpoints (HF and Meta layout, written by mm-llama itself) and ways to break them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mm_llama.checkpoints import save_hf
from mm_llama.config import preset
from mm_llama.model import LlamaDecoder

CFG = preset("tiny", vocab_size=384)  # dim 64, 4 heads, 2 KV heads, 2 layers, head_dim 16


def tiny_model(seed: int = 0) -> LlamaDecoder:
    torch.manual_seed(seed)
    return LlamaDecoder(CFG).eval()


def write_hf(directory: Path, seed: int = 0) -> Path:
    """`config.json` + `model.safetensors` in HF layout."""
    return save_hf(tiny_model(seed), directory)


def write_meta(directory: Path, seed: int = 0) -> Path:
    """`params.json` + `consolidated.00.pth` in Meta layout (Meta names are mm-llama's names)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_model(seed).state_dict(), directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps(CFG.to_meta_params()))
    return directory


def edit_json(file: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Apply `change` to the parsed JSON object; a non-None return value replaces the whole document."""
    data = json.loads(file.read_text())
    replaced = change(data)
    file.write_text(json.dumps(replaced if replaced is not None else data))


def edit_safetensors(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_pth(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = torch.load(file, weights_only=True)
    change(tensors)
    torch.save(tensors, file)
