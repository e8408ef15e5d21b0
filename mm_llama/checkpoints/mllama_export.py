"""mm-llama image model → a Hugging Face Mllama directory (`MllamaForConditionalGeneration.from_pretrained`).

The inverse of `checkpoints.mllama`'s HF reader, with its name tables (`CROSS_LAYER_NAMES`, `LAYER_NAMES`)
read backwards. Keys are written in the layout of the published Llama 3.2 Vision repositories
(`language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`, `multi_modal_projector.*`), which
every transformers version since 4.45 loads (5.x renames them on load) and which other servers expect.

Two places where transformers computes something else than Meta's reference (which mm-llama follows):

* vision taps — `vision_config.intermediate_layers_indices` names the encoder layers whose hidden states
  join the output. Meta (and transformers 4.45) take the states *entering* those layers; transformers
  5.x takes the states *leaving* them. `taps="meta"` (default) writes the indices as the published
  checkpoints do (so the export means the same thing they mean, and mm-llama, vLLM-style Meta readers
  and transformers 4.x reproduce the model exactly; transformers 5.x reads features one layer later).
  `taps="transformers5"` writes each index minus one, so transformers 5.x computes exactly the trained
  features; the directory then records `mm_llama_tap_convention: "leaving"` so mm-llama reads it back
  correctly (a reader that ignores that field would be one layer early).
* text before the first image — Meta zeroes the cross-attention output *and* MLP on rows that see no
  image; transformers zeroes only the MLP (issue 39379), so those rows get an average over all image
  tokens and later rows see that through self-attention. No weight layout can change that; prompts that
  start with `<|image|>` have no such rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mm_llama.atomic_file import atomic_write
from mm_llama.checkpoints.hf import LAYER_NAMES, permute_for_hf, write_safetensors
from mm_llama.checkpoints.mllama import (
    CROSS_LAYER_NAMES, IMAGE_ROW_KEY, TAP_CONVENTION_KEY, fusion_to_merged_layers, merged_self_layer,
)
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.multimodal import N_FUSION_TOKENS, MultimodalLlama

TAP_CONVENTIONS = ("meta", "transformers5")

_OURS_TO_HF_LAYER = {ours: hf for hf, ours in LAYER_NAMES.items()}
_OURS_TO_HF_CROSS = {ours: hf for hf, ours in CROSS_LAYER_NAMES.items()}


def check_mllama_exportable(model: MultimodalLlama, source: str) -> None:
    """A CheckpointError unless `model` is exactly what an HF Mllama holds: one image modality with Llama 3.2
    Vision's encoder (a timm ViT and the video / speech parts have no place in that layout)."""
    others = [m for m in model.modality_names if m != "image"]
    if "image" not in model.modality_names:
        raise CheckpointError(f"{source} has no image modality (its modalities: {list(model.modality_names)}); "
                              "--format hf-mllama writes image models; export its LM with --format hf")
    if others:
        raise CheckpointError(f"{source} also has the modalities {others}, which the HF Mllama layout cannot hold "
                              "(it has image cross-attention only); transformers could not load them")
    if model.image.encoder_kind != "mllama":
        raise CheckpointError(
            f"{source} reads images with a {model.image.encoder_kind} ViT (model.encoder={model.image.encoder_kind}), "
            "not Llama 3.2 Vision's tiled encoder with gated global layers and per-tile position embeddings, which is "
            "the only vision tower transformers' Mllama has; --format hf-mllama needs a run trained with "
            "model.encoder=mllama (e.g. from a Llama 3.2 Vision checkpoint as model.base_lm)")


def hf_mllama_state_dict(model: MultimodalLlama) -> dict[str, torch.Tensor]:
    """The model's tensors under the published Mllama names (self-attention q/k permuted for HF's RoPE; the
    embedding has the 8 rows past the vocabulary, `<|image|>` first and the 7 reserved ones zero)."""
    cfg = model.text_cfg
    fusion = sorted(model.image.fusion_layers)
    merged_cross = dict(zip(fusion, fusion_to_merged_layers(fusion)))
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous().cpu()
        if key.startswith("image.encoder."):
            out["vision_model." + key.removeprefix("image.encoder.")] = tensor
        elif key.startswith("image.projector."):
            out["multi_modal_projector." + key.removeprefix("image.projector.")] = tensor
        elif key in ("decoder.tok_embeddings.weight", IMAGE_ROW_KEY):
            continue  # joined below
        elif key == "decoder.norm.weight":
            out["language_model.model.norm.weight"] = tensor
        elif key == "decoder.output.weight":
            out["language_model.lm_head.weight"] = tensor
        else:
            out[_layer_key(key, cfg, merged_cross)] = _permuted(key, tensor, cfg)
    rows = torch.zeros(N_FUSION_TOKENS, cfg.dim, dtype=state[IMAGE_ROW_KEY].dtype)
    rows[:1] = state[IMAGE_ROW_KEY].detach().cpu()
    out["language_model.model.embed_tokens.weight"] = torch.cat([state["decoder.tok_embeddings.weight"].cpu(), rows])
    return out


def _layer_key(key: str, cfg: Any, merged_cross: dict[int, int]) -> str:
    """`decoder.layers.i.…` (self-attention layer or the fusion block before it) → the merged HF name."""
    layer, _, rest = key.removeprefix("decoder.layers.").partition(".")
    if not key.startswith("decoder.layers.") or not layer.isdigit():
        raise CheckpointError(f"no HF Mllama name for tensor {key!r}")
    own = int(layer)
    if rest.startswith("fusion.image."):
        name = _OURS_TO_HF_CROSS.get(rest.removeprefix("fusion.image."))
        index = merged_cross[own]
    else:
        name = _OURS_TO_HF_LAYER.get(rest)
        index = merged_self_layer(own, list(merged_cross))
    if name is None:
        raise CheckpointError(f"no HF Mllama name for tensor {key!r}")
    return f"language_model.model.layers.{index}.{name}"


def _permuted(key: str, tensor: torch.Tensor, cfg: Any) -> torch.Tensor:
    if ".fusion." in key:  # cross-attention has no RoPE
        return tensor
    if key.endswith("attention.wq.weight"):
        return permute_for_hf(tensor, cfg.n_heads)
    if key.endswith("attention.wk.weight"):
        return permute_for_hf(tensor, cfg.n_kv_heads)
    return tensor


def hf_mllama_config(model: MultimodalLlama, *, dtype: torch.dtype, taps: str = "meta",
                     pad_id: int | None = None) -> dict[str, Any]:
    """`config.json` of `MllamaForConditionalGeneration` for `model` (see the module docstring for `taps`;
    `pad_id`: the tokenizer's `<|finetune_right_pad_id|>`, None when it has none)."""
    if taps not in TAP_CONVENTIONS:
        raise ValueError(f"unknown tap convention {taps!r}; use one of {list(TAP_CONVENTIONS)}")
    cfg = model.text_cfg
    text = cfg.to_hf_dict()
    for key in ("architectures", "torch_dtype", "head_dim", "attention_bias", "mlp_bias"):
        text.pop(key)
    fusion = sorted(model.image.fusion_layers)
    text.update(model_type="mllama_text_model", num_hidden_layers=cfg.n_layers + len(fusion),
                cross_attention_layers=fusion_to_merged_layers(fusion), tie_word_embeddings=False, pad_token_id=pad_id)
    vision = model.image.vision_cfg.to_hf_dict()
    vision["model_type"] = "mllama_vision_model"
    if taps == "transformers5":
        if 0 in model.image.vision_cfg.taps:
            raise CheckpointError("the encoder taps the input of layer 0, which transformers 5.x cannot express (its "
                                  "indices name layer outputs); export with --vision-taps meta")
        vision["intermediate_layers_indices"] = [t - 1 for t in model.image.vision_cfg.taps]
        vision[TAP_CONVENTION_KEY] = "leaving"
    return {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
        "image_token_index": model.image.token_id, "text_config": text, "vision_config": vision,
        "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": False,
    }


def save_hf_mllama(model: MultimodalLlama, directory: str | Path, *, taps: str = "meta", pad_id: int | None = None,
                   max_shard_bytes: int | None = None, source: str = "the model") -> Path:
    """Write `config.json` and the safetensors of `model` in HF Mllama layout (atomically, file by file)."""
    check_mllama_exportable(model, source)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_mllama_state_dict(model)
    config = hf_mllama_config(model, dtype=next(iter(tensors.values())).dtype, taps=taps, pad_id=pad_id)
    atomic_write(directory / "config.json", json.dumps(config, indent=2) + "\n")
    write_safetensors(tensors, directory, max_shard_bytes)
    return directory


__all__ = ["TAP_CONVENTIONS", "TAP_CONVENTION_KEY", "check_mllama_exportable", "hf_mllama_config",
           "hf_mllama_state_dict", "save_hf_mllama"]
