"""Build what a recipe describes: the model (with its trainable set declared), its tokenizer.

* `model.kind: llama` — a `LlamaDecoder` for pretraining tiny LMs: from `model.init_from` (an earlier
  `lm_pretrain` run or any Llama checkpoint directory) or `model.base_lm` (a checkpoint to start
  from), else a new one shaped by `model.text` (a preset name or `LlamaConfig` fields; the vocabulary
  always comes from the tokenizer). Everything trains — unless `model.lora` is set: then only the LoRA
  factors (group `lora`) train and the export merges them into plain weights.
* `model.kind: multimodal` — the frozen base LM (`load_llama(model.base_lm)`) inside a
  `MultimodalLlama` with the recipe's image encoder (`model.encoder` + `model.vision`) and
  cross-attention before `model.fusion_layers`; the encoder's pretrained weights come from
  `model.encoder_checkpoint`, and `model.init_from` (an earlier adapter run: annealing and SFT start
  from pretraining; several runs load as one union) supplies the adapter weights. The stage is declared
  once with `set_trainable(model.train)` (the model's group names, `image.encoder` / `image.fusion`;
  `lora` when `model.lora` puts LoRA on the LM's layers, saved with the adapter). A Llama 3.2 Vision
  checkpoint (HF Mllama or Meta) as `model.base_lm` brings its own trunk and image modality, which then
  trains as `model.train` says (`train.vision_base`).
* `data.task: contrastive` — image-encoder pretraining (`mm_llama.train.contrastive`): a timm ViT
  against the frozen LM's caption features.

The tokenizer comes from `data.tokenizer`, else from the base LM (or `init_from`) directory. Which of
these a recipe builds, and the rest of what a stage does, is the stage registry's (`train.stages`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_llama.adapters.cross_attention import GatedCrossAttentionBlock
from mm_llama.adapters.lora import LoraConfig, apply_lora
from mm_llama.checkpoints.files import iter_safetensors
from mm_llama.checkpoints.loading import LM_RUN_MODEL_DIR as MODEL_DIR, lm_checkpoint_dir, load_llama
from mm_llama.checkpoints.multimodal_loading import (
    ADAPTER_FILE, adapter_state_dict, base_modalities, modalities_from_fields, upgrade_adapter_keys,
)
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.config import LlamaConfig, RopeScaling, preset
from mm_llama.model import LlamaDecoder
from mm_llama.data.tasks import TASKS
from mm_llama.modalities.speech import speech_configs
from mm_llama.multimodal import DECODER_GROUP, MultimodalLlama
from mm_llama.tokenizer import Tokenizer
from mm_llama.trainable import LORA_GROUP, split_lora_group, train_only
from mm_llama.train.recipe import RecipeConfig, RecipeError
from mm_llama.train.vision_base import assign_image_weights, load_vision_base_decoder, vision_base_dir, with_vision_base

ENCODER_FILE = "encoder.safetensors"  # what an image_encoder_pretrain run exports
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


# ------------------------------------------------------------------------------------------ paths


def encoder_weights_file(path: str | Path) -> Path:
    """`path` itself, or `path/encoder.safetensors` for an image_encoder_pretrain run directory."""
    p = Path(path)
    if p.is_dir():
        if (p / ENCODER_FILE).is_file():
            return p / ENCODER_FILE
        raise FileNotFoundError(f"{p} holds no {ENCODER_FILE}; has the image_encoder_pretrain run finished? "
                                "(model.encoder_checkpoint takes that file or its run directory)")
    if not p.is_file():
        raise FileNotFoundError(f"model.encoder_checkpoint {p} does not exist")
    return p


def tokenizer_dir_for(cfg: RecipeConfig) -> Path:
    """Where the tokenizer is: `data.tokenizer`, else the base LM / `init_from` checkpoint directory."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    candidates = [cfg.model.base_lm] + (cfg.model.init_runs() if cfg.model.kind == "llama" else [])
    for value in candidates:
        if value:
            directory = lm_checkpoint_dir(value)
            if any((directory / f).is_file() for f in TOKENIZER_FILES):
                return directory
    raise RecipeError("no tokenizer: set data.tokenizer (a tokenizer.json / tokenizer.model or its directory) "
                      "or use a model.base_lm directory that holds one")


def load_recipe_tokenizer(cfg: RecipeConfig) -> tuple[Tokenizer, Path | None]:
    """The recipe's tokenizer and the directory its files are in (None for a bare file path)."""
    path = tokenizer_dir_for(cfg)
    tok = Tokenizer.from_path(path)
    return tok, (path if path.is_dir() else path.parent)


# ------------------------------------------------------------------------------------------ llama
def text_config(text: str | dict[str, Any] | None, tokenizer: Tokenizer) -> LlamaConfig:
    """`model.text` as a `LlamaConfig` with the tokenizer's vocabulary and BOS/EOS ids.

    `text` is a preset name (`"tiny"`), or a mapping of `LlamaConfig` fields, optionally with
    `preset: NAME` as the starting point (`{preset: tiny, dim: 128, n_layers: 4}`).
    """
    if text is None:
        raise RecipeError("model.kind=llama needs model.text (a preset name such as 'tiny', or LlamaConfig "
                          "fields) or a checkpoint in model.base_lm / model.init_from")
    fields: dict[str, Any] = {"preset": text} if isinstance(text, str) else dict(text)
    name = fields.pop("preset", None)
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise RecipeError(f"model.text has unknown field(s) {unknown}; LlamaConfig fields: {sorted(known)} (plus 'preset')")
    if isinstance(fields.get("rope_scaling"), dict):
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    vocab = fields.get("vocab_size")
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise RecipeError(f"model.text.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
                          "leave it out (the tokenizer's size is used)")
    fields.setdefault("vocab_size", tokenizer.vocab_size)
    fields.setdefault("bos_token_id", tokenizer.bos_id)
    fields.setdefault("eos_token_id", tokenizer.eos_id)
    try:
        return preset(name, **fields) if name is not None else LlamaConfig(**fields)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"model.text: {err}") from err


def build_llama(cfg: RecipeConfig, tokenizer: Tokenizer) -> LlamaDecoder:
    """A trainable `LlamaDecoder`: loaded from `init_from` / `base_lm`, or new from `model.text`."""
    source = (cfg.model.init_runs() or [None])[0] or cfg.model.base_lm
    if source:
        model = load_llama(lm_checkpoint_dir(source))
        if model.cfg.vocab_size < tokenizer.vocab_size:
            raise RecipeError(f"{source} has {model.cfg.vocab_size} vocabulary rows but the tokenizer has "
                              f"{tokenizer.vocab_size} ids; use the checkpoint's own tokenizer")
    else:
        torch.manual_seed(cfg.train.seed)
        model = LlamaDecoder(text_config(cfg.model.text, tokenizer))
    model.train()
    if cfg.model.lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # LoRA fine-tune: the LM stays frozen, its export merges the factors (stages._lm_export)
        attach_lora(model, cfg)
        train_only(split_lora_group({DECODER_GROUP: dict(model.named_parameters())}), [LORA_GROUP])
    return model


def attach_lora(model: nn.Module, cfg: RecipeConfig) -> list[str]:
    """`model.lora` (when set) put on the LM's layers (`adapters.lora.apply_lora`); a bad setting or a
    target that matches no layer is a RecipeError naming it. Returns the wrapped layers' names."""
    if cfg.model.lora is None:
        return []
    try:
        return apply_lora(model, LoraConfig.from_fields(dataclasses.asdict(cfg.model.lora)))
    except ValueError as err:
        raise RecipeError(f"model.lora: {err}") from err


# ------------------------------------------------------------------------------------------ multimodal
def vision_fields(cfg: RecipeConfig) -> dict[str, Any]:
    """`model.vision` (the encoder config fields); `data.max_tiles` fills a missing `max_tiles`."""
    fields = dict(cfg.model.vision)
    fields.setdefault("max_tiles", cfg.data.max_tiles)
    return fields


def check_data_geometry(cfg: RecipeConfig, tile_size: int, max_tiles: int) -> None:
    """The loader must tile images exactly as the encoder expects."""
    if cfg.data.tile_size is not None and cfg.data.tile_size != tile_size:
        raise RecipeError(f"data.tile_size={cfg.data.tile_size} but the encoder uses {tile_size}-pixel tiles; "
                          "set model.vision.tile_size (data.tile_size: null follows the model)")
    if cfg.data.max_tiles != max_tiles:
        raise RecipeError(f"data.max_tiles={cfg.data.max_tiles} but the encoder has max_tiles={max_tiles}; "
                          "set both to the same value")


def load_encoder_checkpoint(model: MultimodalLlama, path: str | Path) -> None:
    """Pretrained encoder weights: for timm a backbone state dict (what image_encoder_pretrain writes,
    or any timm / OpenCLIP file `TimmEncoderConfig.weights` accepts; positional embeddings are
    resampled to the tile size); for mllama a safetensors file of the encoder's state dict (keys as
    `model.image.encoder.state_dict()`, optionally prefixed `image.encoder.`, `encoder.` or `vision_model.`)."""
    if "image" not in model.modality_names:
        raise RecipeError("model.encoder_checkpoint holds image-encoder weights but the model has no image modality; "
                          "remove it (or add image to model.modalities)")
    file = encoder_weights_file(path)
    encoder = model.image.encoder
    if model.image.encoder_kind == "timm":
        from mm_llama.encoders.timm_vit import load_backbone_weights

        load_backbone_weights(encoder.backbone, file)
        return
    tensors = _read_tensors(file)
    for prefix in ("image.encoder.", "encoder.", "vision_model."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    result = encoder.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RecipeError(f"model.encoder_checkpoint {file} does not fit the {model.image.encoder_kind} encoder: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; check model.vision")


def adapter_weights_of(run: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter tensors of an earlier run: its `adapter.safetensors`, else (an unfinished run) the
    trained tensors of its newest readable checkpoint (newer unreadable ones are named in a warning)."""
    from mm_llama.train.checkpointing import TRAINABLE_FILE, list_checkpoints

    directory = Path(run)
    if (directory / ADAPTER_FILE).is_file():
        return _read_tensors(directory / ADAPTER_FILE), directory / ADAPTER_FILE
    if directory.is_file() and directory.suffix == ".safetensors":
        return _read_tensors(directory), directory
    unreadable: list[str] = []
    for _, checkpoint in reversed(list_checkpoints(directory)):
        try:
            return _read_tensors(checkpoint / TRAINABLE_FILE), checkpoint / TRAINABLE_FILE
        except (CheckpointError, FileNotFoundError) as err:
            unreadable.append(str(err))
            warnings.warn(f"model.init_from: passing over checkpoint {checkpoint}: {err}", stacklevel=2)
    if unreadable:
        raise CheckpointError(f"model.init_from {directory}: none of its checkpoints can be read: {'; '.join(unreadable)}")
    raise FileNotFoundError(f"model.init_from {directory} holds neither {ADAPTER_FILE} nor training checkpoints; "
                            "point it at the run directory of the previous stage")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict; a damaged one is a CheckpointError naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    return dict(iter_safetensors([file]))


def _resample_pos_embed(model: MultimodalLlama, name: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A timm backbone's absolute position embedding from an earlier stage's tile size to this one's."""
    from timm.layers import resample_abs_pos_embed

    backbone = model.image.encoder.backbone
    prefix_in_embed = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
    old = int(math.isqrt(tensor.shape[1] - prefix_in_embed))
    grid = backbone.patch_embed.grid_size
    if old * old != tensor.shape[1] - prefix_in_embed:
        raise RecipeError(f"{name}: cannot resample a non-square position embedding {tuple(tensor.shape)}")
    return resample_abs_pos_embed(tensor, new_size=list(grid), old_size=[old, old],
                                  num_prefix_tokens=prefix_in_embed).to(target.dtype)


def load_adapter_weights(model: MultimodalLlama, runs: str | Path | list[str | Path]) -> list[Path]:
    """Continue from earlier stages: copy their adapter weights into `model` (`model.init_from`).

    Several runs load as one union (an image adapter and a speech adapter trained apart); a key that two
    of them hold is an error naming it. Every adapter tensor of a modality the runs cover must be there,
    with the same shape — except a timm backbone's position embedding, which is resampled when the tile
    size changed (annealing at a higher resolution); a modality no run covers keeps its fresh weights.
    Files from before modalities were named load under the image names. The modalities loaded are added
    to `model.loaded_modalities` (the run exports them). Returns the files read.
    """
    tensors: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    files = []
    for run in [runs] if isinstance(runs, (str, Path)) else runs:
        run_tensors, file = adapter_weights_of(run)
        files.append(file)
        for key, tensor in upgrade_adapter_keys(run_tensors).items():
            if key in tensors:
                raise RecipeError(f"model.init_from: {source[key]} and {file} both hold {key}; list runs of "
                                  "different modalities (or one run per modality)")
            tensors[key], source[key] = tensor, file
    where = ", ".join(str(f) for f in files)
    expected = adapter_state_dict(model)
    covered = {_modality_of(k) for k in tensors}
    in_base = base_modalities(model)  # a Llama 3.2 Vision base holds what its runs did not train
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(k for k in set(expected) - set(tensors) if _modality_of(k) in covered - in_base)
    if unexpected or missing:
        raise RecipeError(f"model.init_from {where} does not match this model's adapter: missing {missing[:5]}"
                          f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}; the earlier stage must use the "
                          "same model.encoder, model.vision (except tile_size) and model.fusion_layers")
    state = model.state_dict(keep_vars=True)
    mismatched = []
    with torch.no_grad():
        for name in sorted(set(expected) & set(tensors)):
            source_tensor, target = tensors[name], state[name]
            if source_tensor.shape != target.shape:
                if model.image.encoder_kind == "timm" and name == "image.encoder.backbone.pos_embed":
                    source_tensor = _resample_pos_embed(model, name, source_tensor, target)
                else:
                    mismatched.append(f"{name}: {tuple(source_tensor.shape)} vs {tuple(target.shape)}")
                    continue
            target.copy_(source_tensor)
    if mismatched:
        raise RecipeError(f"model.init_from {where}: shape mismatch(es) {mismatched[:5]}; the earlier stage used another "
                          "encoder / fusion shape")
    model.loaded_modalities |= covered & set(model.modality_names)
    return files


_FUSED_KEY = re.compile(r"decoder\.(?:layers\.\d+\.fusion|tok_embeddings\.media)\.([^.]+)\.")


def _modality_of(key: str) -> str:
    """The modality an adapter key belongs to (`image.encoder.x`, `decoder.layers.3.fusion.image.x` → image)."""
    match = _FUSED_KEY.match(key)
    return match.group(1) if match else key.split(".", 1)[0]


def init_fusion_gates(model: MultimodalLlama, value: float) -> None:
    """Set both tanh gates of every cross-attention block to ``value`` (`model.fusion_gate_init`)."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, GatedCrossAttentionBlock):
                block.gate_attn.fill_(value)
                block.gate_ffwd.fill_(value)


def _task_modality(task: str) -> str | None:
    return TASKS[task].modality if task in TASKS else None


def model_modalities(cfg: RecipeConfig) -> list[str]:
    """`model.modalities`, else the one `data.task` carries (`image` for caption / vqa, `speech` for asr / ast,
    `image` and `video` for the video tasks: frames go through the image encoder)."""
    if cfg.model.modalities:
        return list(cfg.model.modalities)
    modality = _task_modality(cfg.data.task)
    if modality is None:
        raise RecipeError(f"data.task={cfg.data.task!r} carries no media; name the model's modalities in model.modalities")
    return ["image", "video"] if modality == "video" else [modality]


def modality_fields(cfg: RecipeConfig) -> dict[str, Any]:
    """The recipe's model section as `modalities_from_fields` reads it."""
    m = cfg.model
    return {"modalities": model_modalities(cfg), "encoder": m.encoder, "vision": vision_fields(cfg),
            "fusion_layers": list(m.fusion_layers), "speech": dict(m.speech), "video": dict(m.video)}


def build_multimodal(cfg: RecipeConfig, tokenizer: Tokenizer) -> MultimodalLlama:
    """Frozen base LM + the recipe's modalities (image: encoder + fusion; speech: Conformer + adapter),
    with the recipe's trainable groups."""
    model_cfg = cfg.model
    if not model_cfg.base_lm:
        raise RecipeError("model.kind=multimodal needs model.base_lm: the (frozen) Llama checkpoint directory")
    if model_cfg.text is not None:
        raise RecipeError("model.text describes a new LM for model.kind=llama; an image model uses the LM in "
                          "model.base_lm — remove model.text")
    vision_base = vision_base_dir(cfg)  # a Llama 3.2 Vision checkpoint brings the image modality
    if vision_base is not None:
        cfg = with_vision_base(cfg, warn=True)
        model_cfg = cfg.model
        decoder, _, image_tensors = load_vision_base_decoder(vision_base)
    else:
        decoder = load_llama(lm_checkpoint_dir(model_cfg.base_lm))
    if decoder.cfg.vocab_size < tokenizer.vocab_size:
        raise RecipeError(f"the base LM has {decoder.cfg.vocab_size} vocabulary rows but the tokenizer has "
                          f"{tokenizer.vocab_size} ids; use the base LM's tokenizer (data.tokenizer: null)")
    torch.manual_seed(cfg.train.seed)
    try:
        modalities = modalities_from_fields(decoder.cfg, modality_fields(cfg))
    except ValueError as err:
        raise RecipeError(str(err)) from err
    model = MultimodalLlama(decoder, modalities)
    attach_lora(model, cfg)  # before the groups are read: LoRA adds the group `lora`
    trained = model_cfg.trainable_groups(model.group_names())
    if DECODER_GROUP in trained:
        raise RecipeError("model.train lists decoder: the adapter stages keep the LM frozen, and a run's export "
                          "(adapter.safetensors) holds only adapter weights; remove decoder from model.train")
    init_fusion_gates(model, model_cfg.fusion_gate_init)
    if vision_base is not None:
        assign_image_weights(model, image_tensors, vision_base)
    if "image" in model.modality_names and _task_modality(cfg.data.task) in ("image", "video"):  # what the loader tiles
        check_data_geometry(cfg, model.image.encoder.tile_size, model.image.encoder.max_tiles)
    if model_cfg.encoder_checkpoint:
        load_encoder_checkpoint(model, model_cfg.encoder_checkpoint)
    speech_checkpoint = model_cfg.speech.get("encoder_checkpoint") if "speech" in model.modality_names else None
    if speech_checkpoint:
        load_speech_encoder(model.speech.encoder, speech_checkpoint)
    loaded = load_adapter_weights(model, model_cfg.init_runs()) if model_cfg.init_from else []  # last: it wins
    if "speech" in model.modality_names and not speech_checkpoint and not any(_holds_speech(f) for f in loaded):
        set_speech_feature_stats(model, cfg)
    model.set_trainable(trained)
    model.train()
    return model


SPEECH_ENCODER_FILE = "speech_encoder.safetensors"  # what a BEST-RQ run exports


def load_speech_encoder(encoder: nn.Module, path: str | Path) -> Path:
    """A BEST-RQ run's Conformer (`path`: its `speech_encoder.safetensors` or run directory), feature
    statistics included; the shapes must match `model.speech.encoder`."""
    file = Path(path)
    if file.is_dir():
        file = file / SPEECH_ENCODER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"model.speech.encoder_checkpoint {path} holds no {SPEECH_ENCODER_FILE}; has the "
                                "BEST-RQ run (speech_bestrq / tiny_speech_bestrq) finished?")
    result = encoder.load_state_dict(_read_tensors(file), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RecipeError(f"model.speech.encoder_checkpoint {file} does not fit model.speech.encoder: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return file


def build_speech_encoder(cfg: RecipeConfig, tokenizer: Tokenizer | None = None) -> nn.Module:
    """`model.kind: speech_encoder`: a Conformer (`model.speech.encoder`, optionally from
    `model.speech.encoder_checkpoint`) inside a `BestRqModel` (`model.speech.best_rq`)."""
    from mm_llama.encoders.best_rq import BestRqConfig, BestRqModel
    from mm_llama.encoders.conformer import ConformerEncoder

    m = cfg.model
    if m.base_lm or m.init_from:
        raise RecipeError("model.kind=speech_encoder pretrains a Conformer alone: remove model.base_lm / "
                          "model.init_from (continue an encoder with model.speech.encoder_checkpoint)")
    speech = dict(m.speech)
    try:
        encoder_cfg, _ = speech_configs(speech)
        best_rq = BestRqConfig(**dict(speech.get("best_rq") or {}))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"model.speech: {err}") from err
    torch.manual_seed(cfg.train.seed)
    encoder = ConformerEncoder(encoder_cfg)
    if speech.get("encoder_checkpoint"):
        load_speech_encoder(encoder, speech["encoder_checkpoint"])
    else:
        encoder.set_feature_stats(*_shard_feature_stats(cfg))
    model = BestRqModel(encoder, best_rq)
    model.set_trainable(m.trainable_groups(model.group_names()))
    model.train()
    return model


def _holds_speech(file: Path) -> bool:
    """Whether an adapter file holds speech weights (read from its header, not its tensors)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return any(k.startswith("speech.") for k in f.keys())


def set_speech_feature_stats(model: MultimodalLlama, cfg: RecipeConfig) -> None:
    """A fresh speech encoder normalises with the log-mel statistics of the training shards (up to 256
    utterances; stored with the encoder, so evaluation and inference normalise the same way)."""
    model.speech.encoder.set_feature_stats(*_shard_feature_stats(cfg))


def _shard_feature_stats(cfg: RecipeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from mm_llama.data.audio_stats import log_mel_stats

    try:
        mean, std, _ = log_mel_stats(list(cfg.data.shards))
    except (ValueError, FileNotFoundError) as err:
        raise RecipeError(f"data.shards: {err}") from err
    return mean, std


__all__ = [
    "ENCODER_FILE", "MODEL_DIR", "TOKENIZER_FILES", "adapter_weights_of", "attach_lora", "build_llama", "build_multimodal",
    "check_data_geometry", "encoder_weights_file", "init_fusion_gates", "lm_checkpoint_dir", "load_adapter_weights",
    "SPEECH_ENCODER_FILE", "build_speech_encoder", "load_speech_encoder",
    "load_encoder_checkpoint", "load_recipe_tokenizer", "modality_fields", "model_modalities",
    "set_speech_feature_stats", "text_config", "tokenizer_dir_for", "vision_fields",
]
