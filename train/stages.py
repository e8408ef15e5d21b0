"""The stage registry: what each kind of training run builds, reads, keeps frozen and exports.

=============  ==========  ======================  ===============================  ==========================
stage          model.kind  data.task (family)      builds                           exports (in the run dir)
=============  ==========  ======================  ===============================  ==========================
``lm``         llama       lm (text)               a `LlamaDecoder`, all trained    ``model/`` (HF + tokenizer)
``contrastive`` multimodal contrastive             ViT vs frozen LM (`train.contrastive`)  ``encoder.safetensors``
``adapter``    multimodal  caption, vqa, … (image_text)  frozen LM + modalities     ``adapter.safetensors``
``best_rq``    speech_encoder  best_rq (speech_pretrain)  Conformer + BEST-RQ heads  ``speech_encoder.safetensors``
=============  ==========  ======================  ===============================  ==========================

The trainer asks the run's stage for each of these instead of switching on its kind; a new stage (say
BEST-RQ speech-encoder pretraining) is one more entry.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mm_llama.atomic_file import atomic_write
from mm_llama.checkpoints.loading import llama_config_from_dir
from mm_llama.checkpoints.multimodal_loading import ADAPTER_FILE, adapter_state_dict, export_groups
from mm_llama.data.tasks import TASKS, task_names
from mm_llama.fusion import fusion_schedule
from mm_llama.tokenizer import Tokenizer
from mm_llama.modalities.speech import speech_configs
from mm_llama.modalities.video import video_config
from mm_llama.train.build import (
    ENCODER_FILE, MODEL_DIR, SPEECH_ENCODER_FILE, TOKENIZER_FILES, build_llama, build_multimodal, build_speech_encoder,
    lm_checkpoint_dir, load_recipe_tokenizer, model_modalities, vision_fields,
)
from mm_llama.train.recipe import RecipeConfig, RecipeError
from mm_llama.train.vision_base import vision_base_changes, vision_base_dir
from mm_llama.train.sources import EpochSource, packed_text_source, task_loader_source


@dataclass
class Built:
    """What `build` returns: the model (on CPU, fp32, trainable set declared), its tokenizer, where the
    tokenizer files live (copied next to the exports) and the stage's name."""

    model: nn.Module
    tokenizer: Tokenizer | None  # None for a stage that reads no text
    tokenizer_dir: Path | None
    kind: str  # a STAGES name: "lm" | "contrastive" | "adapter" | "best_rq"


@dataclass(frozen=True)
class Stage:
    """One kind of training run.

    `model_kind`: the `model.kind` it needs; `families`: the task families (`mm_llama.data.tasks`) it
    trains on; `product`: what it exports, relative to the run directory. `build(cfg, tokenizer)`: the
    model with its trainable set declared; `source(cfg, built, shards, rank, world_size, evaluation)`:
    its batches; `frozen_lm(model)`: the LM that FSDP may shard (None: the stage trains its LM);
    `export_state(model)`: the tensors it exports; `export(model, run_dir, built, step)`: write them;
    `needs_tokenizer`: False for a stage that reads no text (BEST-RQ).
    """

    name: str
    model_kind: str
    families: tuple[str, ...]
    product: str
    build: Callable[[RecipeConfig, Tokenizer], nn.Module]
    source: Callable[..., EpochSource]
    frozen_lm: Callable[[nn.Module], nn.Module] | None
    export_state: Callable[[nn.Module], dict[str, torch.Tensor]]
    export: Callable[[nn.Module, Path, Built, int], Path]
    needs_tokenizer: bool = True

    @property
    def tasks(self) -> tuple[str, ...]:
        return task_names(*self.families)


def copy_tokenizer(source: Path | None, target: Path) -> None:
    """Put the tokenizer files next to an export (nothing when the tokenizer came from a bare file)."""
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and source.resolve() != target.resolve():
            shutil.copy(source / name, target / name)


# ------------------------------------------------------------------------------------------ lm
def _lm_source(cfg: RecipeConfig, built: Built, shards: list[str], *, rank: int, world_size: int,
               evaluation: bool = False) -> EpochSource:
    return packed_text_source(cfg, built.model.cfg, built.tokenizer, shards, rank=rank, world_size=world_size,
                              evaluation=evaluation)


def _lm_export(model: nn.Module, run_dir: Path, built: Built, step: int) -> Path:
    from mm_llama.adapters.lora import merged_copy
    from mm_llama.checkpoints.hf import save_hf

    export = save_hf(merged_copy(model), run_dir / MODEL_DIR)  # a LoRA fine-tune exports plain, merged weights
    copy_tokenizer(built.tokenizer_dir, export)
    return export


def _no_frozen_lm(model: nn.Module) -> nn.Module:
    raise RecipeError("distributed.fsdp_frozen_lm shards a frozen LM, but model.kind=llama trains the LM; "
                      "set distributed.fsdp_frozen_lm=false")


# ------------------------------------------------------------------------------------------ contrastive
def _build_contrastive(cfg: RecipeConfig, tokenizer: Tokenizer) -> nn.Module:
    from mm_llama.train.contrastive import build_contrastive

    return build_contrastive(cfg, tokenizer)


def _contrastive_source(cfg: RecipeConfig, built: Built, shards: list[str], *, rank: int, world_size: int,
                        evaluation: bool = False) -> EpochSource:
    model = built.model  # the caption layout, read as captions
    return task_loader_source(cfg, "caption", built.tokenizer, model.lm.cfg, shards, tile_size=model.tile_size,
                              max_tiles=model.max_tiles, rank=rank, world_size=world_size, evaluation=evaluation)


def _contrastive_export(model: nn.Module, run_dir: Path, built: Built, step: int) -> Path:
    from mm_llama.train.contrastive import save_encoder

    return save_encoder(model, run_dir / ENCODER_FILE)


# ------------------------------------------------------------------------------------------ adapter
def _adapter_source(cfg: RecipeConfig, built: Built, shards: list[str], *, rank: int, world_size: int,
                    evaluation: bool = False) -> EpochSource:
    model = built.model
    tiles = {}
    if "image" in model.modality_names:  # the loader tiles images as the encoder expects
        tiles = {"tile_size": model.image.encoder.tile_size, "max_tiles": model.image.encoder.max_tiles}
    return task_loader_source(cfg, cfg.data.task, built.tokenizer, model.text_cfg, shards, rank=rank,
                              world_size=world_size, evaluation=evaluation, **tiles)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return adapter_state_dict(model, export_groups(model))


def _adapter_export(model: nn.Module, run_dir: Path, built: Built, step: int) -> Path:
    metadata = {"format": "pt", "step": str(step)}
    export = atomic_write(run_dir / ADAPTER_FILE, safetensors_bytes(_adapter_state(model), metadata=metadata))
    copy_tokenizer(built.tokenizer_dir, run_dir)
    return export


# ------------------------------------------------------------------------------------------ best_rq
def _best_rq_source(cfg: RecipeConfig, built: Built, shards: list[str], *, rank: int, world_size: int,
                    evaluation: bool = False) -> EpochSource:
    return task_loader_source(cfg, cfg.data.task, None, None, shards, rank=rank, world_size=world_size,
                              evaluation=evaluation)


def _best_rq_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.encoder.state_dict().items()}


def _best_rq_export(model: nn.Module, run_dir: Path, built: Built, step: int) -> Path:
    metadata = {"format": "pt", "step": str(step)}
    return atomic_write(run_dir / SPEECH_ENCODER_FILE, safetensors_bytes(_best_rq_state(model), metadata=metadata))


STAGES: dict[str, Stage] = {
    "lm": Stage("lm", "llama", ("text",), MODEL_DIR, build_llama, _lm_source, None,
                lambda model: model.state_dict(), _lm_export),
    "contrastive": Stage("contrastive", "multimodal", ("contrastive",), ENCODER_FILE, _build_contrastive,
                         _contrastive_source, lambda model: model.lm, lambda model: model.encoder.state_dict(),
                         _contrastive_export),
    "adapter": Stage("adapter", "multimodal", ("image_text", "video_text", "audio_text"), ADAPTER_FILE, build_multimodal,
                     _adapter_source, lambda model: model.decoder, _adapter_state, _adapter_export),
    "best_rq": Stage("best_rq", "speech_encoder", ("speech_pretrain",), SPEECH_ENCODER_FILE, build_speech_encoder,
                     _best_rq_source, None, _best_rq_state, _best_rq_export, needs_tokenizer=False),
}


def stage_for(cfg: RecipeConfig) -> Stage:
    """The stage `data.task` belongs to, checking that `model.kind` agrees."""
    task, kind = cfg.data.task, cfg.model.kind
    spec = TASKS.get(task)
    stage = next((s for s in STAGES.values() if spec is not None and spec.family in s.families), None)
    if stage is None:
        trainable = [t for s in STAGES.values() for t in s.tasks]
        raise RecipeError(f"data.task={task!r} has no trainer step yet; use one of {trainable}")
    if stage.model_kind != kind:
        if stage.model_kind == "llama":
            raise RecipeError(f"data.task={task!r} trains a plain LM: set model.kind=llama (got {kind!r})")
        if kind == "llama":
            raise RecipeError(f"model.kind=llama trains on text only: set data.task=lm (got {task!r})")
        raise RecipeError(f"data.task={task!r} is a {stage.name} stage: set model.kind={stage.model_kind} "
                          f"(got {kind!r})")
    return stage


def stage_kind(cfg: RecipeConfig) -> str:
    """The name of the recipe's stage (`lm`, `contrastive`, `adapter`)."""
    return stage_for(cfg).name


def resolve_recipe(cfg: RecipeConfig) -> RecipeConfig:
    """A copy of `cfg` with what loading the run later must not guess: absolute `model.base_lm` (an
    `lm_pretrain` run directory becomes its `model/` folder), the encoder's `max_tiles` in `model.vision`,
    and for adapter stages the modalities, the fusion layer indices the image modality uses (every 4th by
    default) and the speech encoder / adapter fields (presets spelled out)."""
    model = cfg.model
    stage = stage_for(cfg)
    changes: dict[str, Any] = {}
    if model.base_lm:
        changes["base_lm"] = str(lm_checkpoint_dir(model.base_lm).resolve())
    if stage.name in ("contrastive", "adapter"):
        changes["vision"] = vision_fields(cfg)
    if stage.name == "best_rq":
        try:
            encoder, _ = speech_configs(dict(model.speech))
        except ValueError as err:
            raise RecipeError(str(err)) from err
        changes["speech"] = {**dict(model.speech), "encoder": dataclasses.asdict(encoder)}
    if stage.name == "adapter":
        changes["modalities"] = model_modalities(cfg)
        if "speech" in changes["modalities"]:
            try:
                encoder, adapter = speech_configs(dict(model.speech))
            except ValueError as err:
                raise RecipeError(str(err)) from err
            changes["speech"] = {**dict(model.speech), "encoder": dataclasses.asdict(encoder),
                                 "adapter": dataclasses.asdict(adapter)}
        if "video" in changes["modalities"]:
            try:
                aggregator, layers, frame_chunk = video_config(dict(model.video))
            except ValueError as err:
                raise RecipeError(str(err)) from err
            changes["video"] = {"aggregator": dataclasses.asdict(aggregator), "fusion_layers": list(layers),
                                "frame_chunk": frame_chunk}
    vision_base = vision_base_dir(cfg) if stage.name == "adapter" else None
    if vision_base is not None:  # a Llama 3.2 Vision base decides the image settings (train.vision_base)
        changes.update(vision_base_changes(cfg, vision_base))
    elif stage.name == "adapter" and model.base_lm and "image" in changes["modalities"]:
        n_layers = llama_config_from_dir(lm_checkpoint_dir(model.base_lm)).n_layers
        changes["fusion_layers"] = list(model.fusion_layers) or fusion_schedule(n_layers, max(1, n_layers // 4))
        bad = [i for i in changes["fusion_layers"] if i >= n_layers]
        if bad:
            raise RecipeError(f"model.fusion_layers {bad} do not exist in the {n_layers}-layer base LM "
                              f"{model.base_lm}; use indices 0..{n_layers - 1}")
    return dataclasses.replace(cfg, model=dataclasses.replace(model, **changes))


def build(cfg: RecipeConfig) -> Built:
    """The recipe's model (CPU, fp32, trainable set declared) and tokenizer."""
    stage = stage_for(cfg)
    tokenizer, tok_dir = load_recipe_tokenizer(cfg) if stage.needs_tokenizer else (None, None)
    return Built(model=stage.build(cfg, tokenizer), tokenizer=tokenizer, tokenizer_dir=tok_dir, kind=stage.name)


__all__ = ["Built", "STAGES", "Stage", "build", "copy_tokenizer", "resolve_recipe", "stage_for", "stage_kind"]
