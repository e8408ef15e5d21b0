"""`load_llama`: one call for any supported Llama 3 checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from mm_llama.checkpoints.files import config_errors, read_json_object
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


LM_RUN_MODEL_DIR = "model"  # where an lm_pretrain run exports its HF checkpoint


def lm_checkpoint_dir(path: str | Path) -> Path:
    """A Llama checkpoint directory, or an `lm_pretrain` run directory holding one under `model/`."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"LM checkpoint {directory} does not exist; train one with the lm_pretrain "
                                "recipe or point at a Llama 3 checkpoint directory (HF or Meta layout)")
    if not (directory / "config.json").is_file() and not (directory / "params.json").is_file() \
            and (directory / LM_RUN_MODEL_DIR / "config.json").is_file():
        return directory / LM_RUN_MODEL_DIR
    return directory


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


def llama_config_from_dir(directory: Path, max_seq_len: int | None = None) -> LlamaConfig:
    """The text model's config from an HF (`config.json`) or Meta (`params.json`) checkpoint directory."""
    fmt = checkpoint_format(directory)
    if fmt == "hf":
        file = directory / "config.json"
        hf = read_json_object(file)
        if hf.get("model_type") == "mllama":
            raise CheckpointError(
                f"{directory} is a Llama 3.2 Vision (Mllama) checkpoint; load it with load_multimodal "
                "(or the caption / vqa commands)"
            )
        with config_errors(file):
            cfg = LlamaConfig.from_hf_dict(hf)
    else:
        file = directory / "params.json"
        params = read_json_object(file)
        if "vision_chunk_size" in params:
            raise CheckpointError(
                f"{directory} is a Llama 3.2 Vision Meta checkpoint; load it with load_multimodal"
            )
        with config_errors(file):
            cfg = LlamaConfig.from_meta_params(params)
        if "output.weight" not in meta_keys(directory):  # params.json has no tie flag (Llama 3.2 1B/3B)
            cfg = cfg.replace(tie_embeddings=True)
    return cfg.replace(max_seq_len=max_seq_len) if max_seq_len is not None else cfg


def llama_tensors(directory: Path, cfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The text model's tensors under mm-llama names, read one at a time."""
    if checkpoint_format(directory) == "hf":
        return load_hf_state_dict(directory, cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaDecoder(cfg).state_dict().items()}
    return load_meta_state_dict(directory, shapes)


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
    cfg = llama_config_from_dir(directory, max_seq_len)
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
    assign_state_dict(model, llama_tensors(directory, cfg), dtype=parse_dtype(dtype), device=device,
                      source=str(directory))
    return model.eval()
