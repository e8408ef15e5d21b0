"""`load_llama`: one call for any supported Llama 3 checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mm_llama.checkpoints.hf import load_hf_state_dict
from mm_llama.checkpoints.meta import load_meta_state_dict, meta_keys
from mm_llama.checkpoints.state_dict import CheckpointError, assign_state_dict
from mm_llama.config import LlamaConfig
from mm_llama.model import LlamaDecoder

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_format(directory: Path) -> str:
    """`"hf"` or `"meta"`, from the files present; a clear error otherwise."""
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the checkpoint directory that contains it")
    if (directory / "config.json").is_file():
        return "hf"
    if (directory / "params.json").is_file():
        return "meta"
    raise CheckpointError(
        f"{directory} has neither config.json (HF layout) nor params.json (Meta layout); "
        "point --checkpoint at the directory holding the weights"
    )


def load_llama(
    path: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
) -> LlamaDecoder:
    """Load a Llama 3 text model from an HF safetensors or Meta consolidated directory.

    The model is built on the meta device and each checkpoint tensor is placed straight into it, cast to
    `dtype` on `device`.
    """
    directory = Path(path)
    fmt = checkpoint_format(directory)
    dtype = parse_dtype(dtype)
    if fmt == "hf":
        cfg = LlamaConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
    else:
        cfg = LlamaConfig.from_meta_params(json.loads((directory / "params.json").read_text()))
        if "output.weight" not in meta_keys(directory):  # params.json has no tie flag (Llama 3.2 1B/3B)
            cfg = cfg.replace(tie_embeddings=True)
    if max_seq_len is not None:
        cfg = cfg.replace(max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
    if fmt == "hf":
        tensors = load_hf_state_dict(directory, cfg)
    else:
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        tensors = load_meta_state_dict(directory, shapes)
    assign_state_dict(model, tensors, dtype=dtype, device=device, source=str(directory))
    return model.eval()
