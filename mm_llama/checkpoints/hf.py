"""HF `LlamaForCausalLM` safetensors layout ↔ mm-llama (Meta-named) parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import torch
from safetensors.torch import save_file

from mm_llama.atomic_file import atomic_path, atomic_write
from mm_llama.checkpoints.files import iter_safetensors, read_json_object
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.config import LlamaConfig, show_value

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

LAYER_NAMES = {  # HF suffix inside model.layers.i → ours inside layers.i
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta q/k rows (adjacent RoPE pairs) → HF rows (rotate-half halves), per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_for_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_checked(key: str, w: torch.Tensor, n_heads: int, cfg: LlamaConfig, source: Path) -> torch.Tensor:
    """`unpermute_from_hf` after checking that `w` can be a q/k projection of `n_heads` heads."""
    if w.ndim != 2 or w.shape[0] % (2 * n_heads):
        raise CheckpointError(
            f"{source}: tensor {key!r} has shape {tuple(w.shape)}, which cannot be a q/k projection of {n_heads} "
            f"heads (its row count must be a multiple of 2*{n_heads}; the config expects "
            f"({n_heads * cfg.head_dim}, {cfg.dim})); does config.json match these weights?"
        )
    return unpermute_from_hf(w, n_heads)


def hf_key_to_ours(key: str) -> str | None:
    """Our parameter name for an HF key, or None when the key is not part of a Llama decoder."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    match = _LAYER_KEY.fullmatch(key)
    if match and match.group(2) in LAYER_NAMES:
        return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    return None


def ours_key_to_hf(key: str) -> str:
    for hf, ours in TOP_NAMES.items():
        if key == ours:
            return hf
    layer, _, rest = key.removeprefix("layers.").partition(".")
    for hf, ours in LAYER_NAMES.items():
        if rest == ours:
            return f"model.layers.{layer}.{hf}"
    raise KeyError(f"no HF name for parameter {key!r}")


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of an HF checkpoint directory (single file or the shards an index names).

    An index may name shards only inside `directory` (no absolute paths, no `..`); symlinks are followed,
    as in the Hugging Face cache, where snapshot files link to `../../blobs/`.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        return [directory / name for name in _shard_names(index)]
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f" (found {', '.join(found)})" if found else ""
    if not found and any(directory.glob("*.bin")):
        hint = " (found only PyTorch .bin files; re-save them with safe_serialization=True)"
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


def _shard_names(index: Path) -> list[str]:
    """The distinct shard file names of a `model.safetensors.index.json`, each checked."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: 'weight_map' is {show_value(weight_map)}; expected a non-empty object of tensor name -> "
            "shard file; the sharded checkpoint index is corrupt"
        )
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise CheckpointError(
            f"{index}: weight_map entry {bad[0]!r} is {show_value(bad[1])}; expected a shard file name (a string)"
        )
    names = sorted(set(weight_map.values()))
    for name in names:
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts + windows.parts:
            key = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointError(
                f"{index}: weight_map entry {key!r} names shard {name!r}, outside the checkpoint directory; "
                "an index may only name files inside its own directory (refusing to read it)"
            )
    absent = [name for name in names if not (index.parent / name).is_file()]
    if absent:
        raise CheckpointError(
            f"{index} names shard file(s) that are not in {index.parent}: {', '.join(absent)}; "
            "the download is incomplete"
        )
    return names


def load_hf_state_dict(directory: Path, cfg: LlamaConfig, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Our-named tensors from an HF Llama checkpoint, q/k RoPE permutation undone.

    `prefix` selects a sub-model (e.g. `language_model.` inside an Mllama checkpoint); keys outside it are
    skipped. Keys inside it that are not Llama parameters are passed through unchanged so the strict
    loader reports them as unknown.
    """
    for key, tensor in iter_safetensors(safetensors_files(directory)):
        if not key.startswith(prefix) or _IGNORED.fullmatch(key):
            continue
        hf_key = key[len(prefix):]
        ours = hf_key_to_ours(hf_key)
        if ours is None:
            yield key, tensor
            continue
        if ours.endswith("attention.wq.weight"):
            tensor = unpermute_checked(key, tensor, cfg.n_heads, cfg, directory)
        elif ours.endswith("attention.wk.weight"):
            tensor = unpermute_checked(key, tensor, cfg.n_kv_heads, cfg, directory)
        yield ours, tensor


def hf_state_dict(model: torch.nn.Module, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Model parameters under HF names, q/k permuted; a tied output head is not repeated."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "output.weight" and cfg.tie_embeddings:
            continue
        if key.endswith("attention.wq.weight"):
            tensor = permute_for_hf(tensor, cfg.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_for_hf(tensor, cfg.n_kv_heads)
        out[ours_key_to_hf(key)] = tensor.detach().contiguous().cpu()
    return out


def save_hf(model: torch.nn.Module, directory: str | Path, *, max_shard_bytes: int | None = None,
            tokenizer_dir: str | Path | None = None, chat: bool = False) -> Path:
    """Write `config.json`, `generation_config.json` + safetensors in HF layout (sharded with an index above
    `max_shard_bytes`); each file is written atomically (`mm_llama.atomic_file`), so a reader never sees a
    torn one. With `tokenizer_dir` (a directory holding `tokenizer.json` or Meta's `tokenizer.model`) the
    tokenizer files and chat template are written too (`serving_files`) and the generation config stops at
    its end_of_text / eom / eot ids; `chat`: the tokenizer's EOS is `<|eot_id|>`."""
    from mm_llama.checkpoints.serving_files import (
        tokenizer_generation_ids, write_generation_config, write_tokenizer_files,
    )

    cfg: LlamaConfig = model.cfg
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, cfg)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(directory / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    ids = {"bos_id": cfg.bos_token_id, "stop_ids": [cfg.eos_token_id], "pad_id": None}
    if tokenizer_dir is not None:
        tok = write_tokenizer_files(Path(tokenizer_dir), directory, image_id=None, chat=chat, max_len=cfg.max_seq_len)
        ids = tokenizer_generation_ids(tok)
    write_generation_config(directory, **ids)
    write_safetensors(tensors, directory, max_shard_bytes)
    return directory


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` plus `model.safetensors.index.json`."""
    shards = _split_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        with atomic_path(directory / SINGLE_FILE) as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(directory / name) as tmp:
            save_file(shard, str(tmp), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
