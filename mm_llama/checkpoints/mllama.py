"""Llama 3.2 Vision checkpoints: HF Mllama safetensors (legacy and current key layouts) and Meta consolidated.

HF merges self- and cross-attention layers into one list (`cross_attention_layers`, e.g. 11B:
[3, 8, 13, …, 38] of 40); a cross-attention layer at merged index j runs before self-attention layer
`j − (cross layers before j)`, which is where mm-llama wraps it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import torch

from mm_llama.checkpoints.files import iter_safetensors, load_torch_file
from mm_llama.checkpoints.hf import LAYER_NAMES, safetensors_files, unpermute_checked
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.config import ConfigFields, LlamaConfig, show_value

IMAGE_ROW_KEY = "decoder.tok_embeddings.media.image.weight"  # the <|image|> row (Meta's learnable row 0)
# In `vision_config` of an mm-llama export for transformers 5.x (`--vision-taps transformers5`): "leaving" means
# `intermediate_layers_indices` name the layer *before* each tap (transformers 5.x reads layer outputs).
TAP_CONVENTION_KEY = "mm_llama_tap_convention"

CROSS_LAYER_NAMES = {  # HF suffix inside a cross-attention layer → ours inside the fusion block
    "cross_attn.q_proj.weight": "attention.wq.weight",
    "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight",
    "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight",
    "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "cross_attn_attn_gate": "gate_attn",
    "cross_attn_mlp_gate": "gate_ffwd",
}

# (regex on the HF key, replacement giving a canonical "<part>:<rest>" name) for both key layouts.
_HF_PREFIXES = [
    (re.compile(r"^(?:language_model\.model|model\.language_model)\.(.+)$"), "text:{}"),
    (re.compile(r"^(?:language_model\.lm_head|lm_head)\.(.+)$"), "head:{}"),
    (re.compile(r"^(?:model\.)?vision_model\.(.+)$"), "vision:{}"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.(.+)$"), "projector:{}"),
]
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def merged_to_fusion_layers(cross_attention_layers: list[int]) -> list[int]:
    """HF merged cross-attention indices → indices of the self-attention layers they precede."""
    cross = sorted(cross_attention_layers)
    return [j - k for k, j in enumerate(cross)]


def fusion_to_merged_layers(fusion_layers: list[int]) -> list[int]:
    """Inverse of `merged_to_fusion_layers`: the k-th cross-attention layer (in order) before self-attention
    layer f sits at merged index `f + k` (11B: [3, 7, …, 31] → [3, 8, …, 38])."""
    return [f + k for k, f in enumerate(sorted(fusion_layers))]


def merged_self_layer(own: int, fusion_layers: list[int]) -> int:
    """The merged index of self-attention layer `own`: after every cross-attention layer placed before it
    or before an earlier layer."""
    return own + sum(1 for f in fusion_layers if f <= own)


def text_config_from_hf(text: dict[str, Any]) -> tuple[LlamaConfig, list[int]]:
    """The trunk's `LlamaConfig` and fusion layer indices from an Mllama `text_config` (ValueError naming the
    field when it is malformed)."""
    fields = ConfigFields(text, where="text_config", missing_hint="is this a Llama 3.2 Vision (Mllama) config.json?")
    merged = fields.integer("num_hidden_layers")
    cross = fields.raw("cross_attention_layers") or []
    ok = isinstance(cross, list) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < merged
                                         for c in cross)
    if not ok or len(set(cross)) != len(cross) or len(cross) >= merged:
        raise ValueError(
            f"'text_config.cross_attention_layers' is {show_value(cross)}; expected distinct layer indices in "
            f"0..{merged - 1} (text_config.num_hidden_layers is {merged}, self-attention layers included)"
        )
    trunk = dict(text, num_hidden_layers=merged - len(cross))
    return LlamaConfig.from_hf_dict(trunk, where="text_config"), merged_to_fusion_layers(cross)


def load_hf_mllama_tensors(
    directory: Path, text_cfg: LlamaConfig, cross_attention_layers: list[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our-named tensors (`decoder.*`, `image.encoder.*`, `image.projector.*`) from an HF Mllama checkpoint.

    Of the 8 learnable embedding rows past the vocabulary only row 0 (`<|image|>`) is used; the other
    seven are reserved in Meta's release and never trained, so they are not loaded."""
    cross = sorted(cross_attention_layers)
    for key, tensor in iter_safetensors(safetensors_files(directory)):
        canonical = _canonical(key)
        if canonical is None:
            yield key, tensor  # reported as unknown by the strict loader
            continue
        part, rest = canonical.split(":", 1)
        if part == "vision":
            yield f"image.encoder.{rest}", tensor
        elif part == "projector":
            yield f"image.projector.{rest}", tensor
        elif part == "head":
            yield f"decoder.output.{rest}", tensor
        elif rest == "embed_tokens.weight":
            yield "decoder.tok_embeddings.weight", tensor[: text_cfg.vocab_size]
            yield IMAGE_ROW_KEY, tensor[text_cfg.vocab_size:text_cfg.vocab_size + 1]
        elif rest == "norm.weight":
            yield "decoder.norm.weight", tensor
        else:
            yield _text_layer(key, rest, tensor, text_cfg, cross, directory)


def _canonical(key: str) -> str | None:
    for pattern, template in _HF_PREFIXES:
        match = pattern.match(key)
        if match:
            return template.format(match.group(1))
    return None


def _text_layer(
    key: str, rest: str, tensor: torch.Tensor, cfg: LlamaConfig, cross: list[int], directory: Path
) -> tuple[str, torch.Tensor]:
    match = _LAYER.fullmatch(rest)
    if not match:
        return key, tensor
    merged, suffix = int(match.group(1)), match.group(2)
    own = merged - sum(1 for c in cross if c < merged)
    if merged in cross:
        name = CROSS_LAYER_NAMES.get(suffix)
        return (f"decoder.layers.{own}.fusion.image.{name}", tensor) if name else (key, tensor)
    name = LAYER_NAMES.get(suffix)
    if name is None:
        return key, tensor
    if name == "attention.wq.weight":
        tensor = unpermute_checked(key, tensor, cfg.n_heads, cfg, directory)
    elif name == "attention.wk.weight":
        tensor = unpermute_checked(key, tensor, cfg.n_kv_heads, cfg, directory)
    return f"decoder.layers.{own}.{name}", tensor


# ---------------------------------------------------------------------------------------- Meta layout
_META_TEXT_IGNORED = {"text_model.rope.freqs"}


def load_meta_mllama_tensors(
    directory: Path, fusion_layers: list[int], vision_cfg: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our-named tensors from Meta's `consolidated.00.pth` (llama-models module names).

    Text: `text_model.{tok_embeddings, learnable_embedding, layers.i.*, cross_attention_layers.c.*, norm,
    output}`; vision: `vision_model.vision_encoder.*` and `vision_model.vision_projection.*`.
    """
    from mm_llama.checkpoints.meta import consolidated_files
    from mm_llama.encoders.mllama_vision import meta_vision_state_dict_to_ours

    files = consolidated_files(directory)
    if len(files) > 1:
        raise CheckpointError(
            f"{directory} holds {len(files)} model-parallel shards; mm-llama loads single-file Llama 3.2 "
            "Vision Meta checkpoints (11B). Convert a sharded one with transformers' Mllama converter first."
        )
    sd = load_torch_file(files[0])
    schedule = sorted(fusion_layers)
    vision: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key in _META_TEXT_IGNORED:
            continue
        if key.startswith("vision_model.vision_encoder."):
            vision[key[len("vision_model.vision_encoder."):]] = tensor
        elif key.startswith("vision_model.vision_projection."):
            yield "image.projector." + key[len("vision_model.vision_projection."):], tensor
        elif key == "text_model.learnable_embedding.weight":
            yield IMAGE_ROW_KEY, tensor[:1]
        elif key.startswith("text_model.cross_attention_layers."):
            index, _, rest = key[len("text_model.cross_attention_layers."):].partition(".")
            c = int(index) if index.isdigit() else len(schedule)
            if c >= len(schedule):
                yield key, tensor
                continue
            yield f"decoder.layers.{schedule[c]}.fusion.image.{rest}", tensor
        elif key.startswith("text_model."):
            yield "decoder." + key[len("text_model."):], tensor
        else:
            yield key, tensor
    for key, tensor in meta_vision_state_dict_to_ours(vision, vision_cfg).items():
        yield f"image.encoder.{key}", tensor
