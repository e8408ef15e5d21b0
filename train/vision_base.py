"""A published Llama 3.2 Vision checkpoint as the base of an adapter run (`model.base_lm=MLLAMA_DIR`).

The checkpoint (HF Mllama or Meta layout) brings a whole image modality: its text trunk loads as the
frozen LM, and its vision encoder, projector, cross-attention layers and `<|image|>` row become the
run's `image` modality, which trains as `model.train` says. So the checkpoint, not the recipe, decides
the image settings:

* `model.encoder: timm` (the paper recipes' default) describes a fresh ViT the checkpoint replaces; its
  `model.vision` and `model.fusion_layers` are ignored (a warning names them);
* `model.encoder: mllama` settings a recipe states (`model.vision.*`, a non-empty `model.fusion_layers`)
  must equal the checkpoint's: a RecipeError names the first that differs;
* `model.encoder_checkpoint` would overwrite the checkpoint's encoder and is refused; `model.init_from`
  may name an earlier run trained from the same checkpoint.

The run's `config.yaml` records the checkpoint's settings, and its `adapter.safetensors` holds only what
trained (`multimodal_loading.export_groups`): loading the run reads the rest from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch

from mm_llama.checkpoints.loading import lm_checkpoint_dir
from mm_llama.checkpoints.multimodal_loading import BASE_MODALITIES
from mm_llama.checkpoints.state_dict import assign_state_dict
from mm_llama.checkpoints.vision_checkpoint import (
    is_vision_checkpoint, vision_checkpoint_config, vision_checkpoint_tensors,
)
from mm_llama.model import LlamaDecoder
from mm_llama.multimodal import MultimodalConfig, MultimodalLlama
from mm_llama.train.recipe import RecipeConfig, RecipeError


def vision_base_dir(cfg: RecipeConfig) -> Path | None:
    """`model.base_lm` when it is a Llama 3.2 Vision checkpoint (HF Mllama or Meta), else None."""
    if not cfg.model.base_lm:
        return None
    directory = lm_checkpoint_dir(cfg.model.base_lm)
    return directory if is_vision_checkpoint(directory) else None


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


def vision_base_changes(cfg: RecipeConfig, base: Path, *, warn: bool = True) -> dict[str, Any]:
    """The `model` fields the checkpoint in `base` decides (`encoder`, `vision`, `fusion_layers`), after
    checking that the recipe does not contradict it (RecipeError naming the value and what to do); with
    `warn`, a warning names the timm settings it replaces."""
    from mm_llama.train.build import model_modalities  # build imports this module

    base_cfg = vision_checkpoint_config(base)
    m = cfg.model
    where = f"the Llama 3.2 Vision checkpoint {base}"
    if "image" not in model_modalities(cfg):
        raise RecipeError(f"model.base_lm is {where}, whose image modality comes with it, but the run's modalities "
                          f"are {model_modalities(cfg)}; add image (model.modalities=[image, ...])")
    if m.encoder_checkpoint:
        raise RecipeError(f"model.encoder_checkpoint={m.encoder_checkpoint} would replace the vision encoder of {where}; "
                          "set model.encoder_checkpoint=null (the checkpoint's encoder is the starting point)")
    absent = [run for run in m.init_runs() if not Path(run).exists()]
    if absent:
        raise RecipeError(f"model.init_from={absent[0]} does not exist; {where} brings a trained image modality, so "
                          "no earlier stage is needed: set model.init_from=null (or name a run trained from this "
                          "checkpoint)")
    vision = dataclasses.asdict(base_cfg.vision)
    if m.encoder == "mllama":
        for key, value in m.vision.items():
            if key not in vision:
                raise RecipeError(f"model.vision.{key} is not a Llama 3.2 Vision encoder setting; remove it (the "
                                  f"encoder's settings come from {where})")
            if _show(value) != _show(vision[key]):
                raise RecipeError(f"model.vision.{key}={_show(value)} but {where} has {key}={_show(vision[key])}; "
                                  f"remove model.vision.{key} (the checkpoint's value is used) or start from a "
                                  "checkpoint with that value")
        if m.fusion_layers and list(m.fusion_layers) != list(base_cfg.fusion_layers):
            raise RecipeError(f"model.fusion_layers={list(m.fusion_layers)} but {where} has cross-attention before "
                              f"layers {list(base_cfg.fusion_layers)}; set model.fusion_layers=[] (the checkpoint's "
                              "layers are used)")
    elif warn:
        warnings.warn(f"model.base_lm is {where}: its Llama 3.2 Vision encoder (tile {base_cfg.vision.tile_size}, "
                      f"{base_cfg.vision.max_tiles} tiles) and cross-attention layers {list(base_cfg.fusion_layers)} "
                      f"replace the recipe's {m.encoder} encoder settings (model.vision, model.fusion_layers)",
                      stacklevel=2)
    return {"encoder": "mllama", "vision": vision, "fusion_layers": list(base_cfg.fusion_layers)}


def with_vision_base(cfg: RecipeConfig, *, warn: bool = False) -> RecipeConfig:
    """`cfg` with the image settings of a Llama 3.2 Vision `model.base_lm` (unchanged for a text-only base)."""
    base = vision_base_dir(cfg)
    if base is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **vision_base_changes(cfg, base, warn=warn)))


def load_vision_base_decoder(base: Path) -> tuple[LlamaDecoder, MultimodalConfig, dict[str, torch.Tensor]]:
    """The checkpoint's text trunk as a frozen-to-be `LlamaDecoder` (fp32, CPU), its config, and the rest of
    its tensors (the image modality's, under model names) for `assign_image_weights`."""
    base_cfg = vision_checkpoint_config(base)
    trunk: list[tuple[str, torch.Tensor]] = []
    image: dict[str, torch.Tensor] = {}
    for key, tensor in vision_checkpoint_tensors(base, base_cfg):
        if key.startswith("decoder.") and ".fusion." not in key and ".media." not in key:
            trunk.append((key.removeprefix("decoder."), tensor))
        else:
            image[key] = tensor
    with torch.device("meta"):
        decoder = LlamaDecoder(base_cfg.text)
    assign_state_dict(decoder, trunk, dtype=torch.float32, device="cpu", source=str(base))
    return decoder, base_cfg, image


def assign_image_weights(model: MultimodalLlama, tensors: dict[str, torch.Tensor], base: Path) -> None:
    """Copy the checkpoint's image tensors into `model` (every image parameter must be among them, with its
    shape) and record that the base holds the image modality (`export_groups` then exports only what trains)."""
    state = model.state_dict(keep_vars=True)
    expected = {k for k in state if k.startswith("image.") or ".fusion.image." in k or ".media.image." in k}
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unknown:
        raise RecipeError(f"{base} does not fit the image modality built from its own config: missing {missing[:5]}, "
                          f"unknown {unknown[:5]}; the checkpoint is incomplete or damaged")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(state[key].shape):
                raise RecipeError(f"{base}: tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(state[key].shape)}; does config.json match the weights?")
            state[key].copy_(tensor.to(state[key].dtype))
    setattr(model, BASE_MODALITIES, frozenset({"image"}))


__all__ = ["assign_image_weights", "load_vision_base_decoder", "vision_base_changes", "vision_base_dir",
           "with_vision_base"]
