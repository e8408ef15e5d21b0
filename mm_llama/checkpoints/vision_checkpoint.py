"""Published Llama 3.2 Vision checkpoint directories: recognise them and read their config and tensors.

Two layouts: HF Mllama (`config.json` with `model_type: mllama` + safetensors) and Meta's
(`params.json` with `vision_chunk_size` + `consolidated.00.pth`). Both describe a whole image model —
text trunk, ViT, projector, cross-attention layers — so they can serve as the base of a run
(`model.base_lm`) as well as be loaded for inference (`load_multimodal`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch

from mm_llama.checkpoints.files import config_errors, read_json_object
from mm_llama.checkpoints.loading import checkpoint_format
from mm_llama.checkpoints.mllama import (
    TAP_CONVENTION_KEY, fusion_to_merged_layers, load_hf_mllama_tensors, load_meta_mllama_tensors, text_config_from_hf,
)
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.config import ConfigFields, LlamaConfig
from mm_llama.fusion import fusion_schedule
from mm_llama.multimodal import MultimodalConfig


def vision_config_class(encoder: str) -> type:
    """The config dataclass of an image encoder family (`mllama` or `timm`)."""
    if encoder == "mllama":
        from mm_llama.encoders.mllama_vision import VisionConfig

        return VisionConfig
    if encoder == "timm":
        from mm_llama.encoders.timm_vit import TimmEncoderConfig

        return TimmEncoderConfig
    raise ValueError(f"unknown image encoder {encoder!r}; use 'mllama' or 'timm'")


def vision_config_from_dict(encoder: str, fields: dict[str, Any]) -> Any:
    """Rebuild an encoder config from YAML/JSON fields (lists become the dataclass' tuples)."""
    cls = vision_config_class(encoder)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"unknown {encoder} encoder setting(s) {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) and "tuple" in str(known[k].type) else v for k, v in fields.items()}
    return cls(**values)


def is_vision_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` is a Llama 3.2 Vision checkpoint (HF Mllama or Meta layout); False for anything
    else, including directories that do not exist or hold no config."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return read_json_object(directory / "config.json").get("model_type") == "mllama"
    if (directory / "params.json").is_file():
        return "vision_chunk_size" in read_json_object(directory / "params.json")
    return False


def config_from_hf_mllama(directory: Path) -> MultimodalConfig:
    """The image model an HF Mllama `config.json` describes (CheckpointError naming a bad field)."""
    file = directory / "config.json"
    hf = read_json_object(file)
    if hf.get("model_type") != "mllama":
        raise CheckpointError(
            f"{directory} holds a {hf.get('model_type', 'unknown')!r} model, not Llama 3.2 Vision (mllama); "
            "for a text-only Llama use `mm-llama generate`"
        )
    with config_errors(file):
        fields = ConfigFields(hf, missing_hint="is this a Llama 3.2 Vision (Mllama) config.json?")
        text, vision_fields = fields.section("text_config"), fields.section("vision_config")
        if text is None or vision_fields is None:
            raise ValueError(f"the config is missing the field {'text_config' if text is None else 'vision_config'!r}"
                             "; an Mllama config.json has both text_config and vision_config objects")
        text_cfg, fusion = text_config_from_hf(text.data)
        vision = vision_config_class("mllama").from_hf_dict(hf)  # reads hf["vision_config"], names it so
        if vision_fields.data.get(TAP_CONVENTION_KEY) == "leaving":  # an export for transformers 5.x
            vision = vision.replace(taps=tuple(t + 1 for t in vision.taps))
        return MultimodalConfig(text=text_cfg, vision=vision, encoder="mllama", fusion_layers=tuple(fusion))


def config_from_meta_vision(directory: Path) -> MultimodalConfig:
    """The image model a Meta Llama 3.2 Vision `params.json` describes."""
    file = directory / "params.json"
    params = read_json_object(file)
    if "vision_chunk_size" not in params:
        raise CheckpointError(
            f"{directory}/params.json describes a text-only Llama (no vision_chunk_size); "
            "for it use `mm-llama generate`"
        )
    with config_errors(file):
        text_cfg = LlamaConfig.from_meta_params(params)
        fields = ConfigFields(params, missing_hint="a Llama 3.2 Vision params.json states it")
        fusion = fusion_schedule(text_cfg.n_layers, fields.integer("vision_num_cross_attention_layers"))
        # Meta hard-codes the ViT-H/14 shape; `vision_encoder` (an mm-llama extension) overrides it for tests.
        extra = fields.section("vision_encoder")
        vision_fields = {"tile_size": fields.integer("vision_chunk_size"),
                         "max_tiles": fields.integer("vision_max_num_chunks", 4), **(extra.data if extra else {})}
        vision = vision_config_from_dict("mllama", vision_fields)
        return MultimodalConfig(text=text_cfg, vision=vision, encoder="mllama", fusion_layers=tuple(fusion))


def vision_checkpoint_config(directory: str | Path) -> MultimodalConfig:
    """The image model (trunk, ViT, fusion layers) of an HF Mllama or Meta Llama 3.2 Vision directory."""
    directory = Path(directory)
    if checkpoint_format(directory) == "hf":
        return config_from_hf_mllama(directory)
    return config_from_meta_vision(directory)


def vision_checkpoint_tensors(directory: str | Path, cfg: MultimodalConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Its tensors under mm-llama names (`decoder.*`, `image.encoder.*`, `image.projector.*`, the fusion
    blocks and the `<|image|>` row), read one at a time; `cfg` is `vision_checkpoint_config`'s."""
    directory = Path(directory)
    if checkpoint_format(directory) == "hf":
        return load_hf_mllama_tensors(directory, cfg.text, fusion_to_merged_layers(list(cfg.fusion_layers)))
    return load_meta_mllama_tensors(directory, list(cfg.fusion_layers), cfg.vision)


__all__ = [
    "config_from_hf_mllama", "config_from_meta_vision", "is_vision_checkpoint", "vision_checkpoint_config",
    "vision_checkpoint_tensors", "vision_config_class", "vision_config_from_dict",
]
