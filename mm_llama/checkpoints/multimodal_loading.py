"""`load_multimodal` and adapter checkpoints: one call for any image-model directory.

Accepted directories: HF Mllama (`config.json` with `model_type: mllama`), Meta Llama 3.2 Vision
(`params.json` with `vision_chunk_size` + `consolidated.00.pth`), or an mm-llama run/export
(`config.yaml` naming the base LM + `adapter.safetensors` with only the trained weights).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from mm_llama.adapters.lora import LORA_GROUP, LoraConfig, apply_lora, lora_config_of
from mm_llama.atomic_file import atomic_write
from mm_llama.checkpoints.files import iter_safetensors
from mm_llama.checkpoints.image_processor import read_image_processing
from mm_llama.checkpoints.loading import llama_config_from_dir, llama_tensors, lm_checkpoint_dir, parse_dtype
from mm_llama.checkpoints.mllama import IMAGE_ROW_KEY
from mm_llama.checkpoints.state_dict import CheckpointError, assign_state_dict
from mm_llama.checkpoints.vision_checkpoint import (  # noqa: F401  (vision_config_class: re-exported)
    is_vision_checkpoint, vision_checkpoint_config, vision_checkpoint_tensors, vision_config_class,
    vision_config_from_dict,
)
from mm_llama.config import LlamaConfig
from mm_llama.fusion import fusion_schedule
from mm_llama.modalities import ImageModality, Modality, SpeechModality
from mm_llama.modalities.speech import speech_config_fields, speech_configs
from mm_llama.modalities.video import VideoModality, video_config, video_config_fields
from mm_llama.model import LlamaDecoder
from mm_llama.multimodal import DECODER_GROUP, MultimodalConfig, MultimodalLlama

ADAPTER_FILE = "adapter.safetensors"
RUN_CONFIG = "config.yaml"


def _build(cfg: MultimodalConfig) -> MultimodalLlama:
    with torch.device("meta"):
        return MultimodalLlama.from_config(cfg)


def load_multimodal(
    path: str | Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
) -> MultimodalLlama:
    """Load an image model (HF Mllama, Meta Llama 3.2 Vision, or an mm-llama adapter run) for inference."""
    directory = Path(path)
    if (directory / RUN_CONFIG).is_file():
        return load_adapter_run(directory, dtype=dtype, device=device, max_seq_len=max_seq_len)
    cfg = vision_checkpoint_config(directory)
    tensors = vision_checkpoint_tensors(directory, cfg)
    if max_seq_len is not None:
        cfg = dataclasses.replace(cfg, text=cfg.text.replace(max_seq_len=max_seq_len))
    model = _build(cfg)
    assign_state_dict(model, tensors, dtype=parse_dtype(dtype), device=device, source=str(directory))
    vision = model.image.vision_cfg  # the directory's own preprocessor_config.json, when it has one
    model.image.processing = read_image_processing(directory, tile_size=vision.tile_size, max_tiles=vision.max_tiles)
    return model.eval()


# ---------------------------------------------------------------------------------------- adapters
def adapter_state_dict(model: MultimodalLlama, groups: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of `groups` (default: every group but the frozen LM's), under state-dict names; the
    names start with the modality (`image.encoder.*`, `decoder.layers.3.fusion.image.*`)."""
    all_groups = model.parameter_groups()
    wanted = [g for g in all_groups if g != DECODER_GROUP] if groups is None else list(groups)
    unknown = [g for g in wanted if g not in all_groups]
    if unknown:
        raise ValueError(f"unknown group(s) {unknown}; the model's groups are {list(all_groups)}")
    trained = {id(p) for group in wanted for p in all_groups[group].values()}
    prefixes = tuple(f"{group}." for group in wanted)  # buffers of a group's module (speech feature statistics)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict(keep_vars=True).items()
            if id(v) in trained or (k.startswith(prefixes) and not isinstance(v, torch.nn.Parameter))}


def export_groups(model: MultimodalLlama) -> list[str]:
    """What an adapter run exports: every group of each modality the run trains (a frozen part of a
    trained modality too, so the run loads on its own) or loaded from an earlier run
    (`model.loaded_modalities`, set by `model.init_from`), nothing of the LM or of modalities that are
    still at their random initialisation — except what a kept modality borrows (video: the image encoder
    and projector it reads frames with), without which the run would not load; LoRA (group `lora`)
    whenever the model has it (its run records it, so loading expects its weights). Adapters of different modalities load onto one LM as a plain
    union of their files, and a run that started from such a union exports all of it. Of a modality the
    base checkpoint holds (`base_modalities`: Llama 3.2 Vision's image part) only the trained groups are
    exported, since loading the run takes the rest from the base."""
    groups = model.parameter_groups()
    trained = {g.split(".", 1)[0] for g, params in groups.items()
               if g != DECODER_GROUP and any(p.requires_grad for p in params.values())}
    kept = trained | set(model.loaded_modalities) | {LORA_GROUP}
    kept |= {borrowed for name in kept if name in model.modalities
             for borrowed in model.modalities[name].borrows}  # video reads image's encoder
    # a Llama 3.2 Vision base holds its image modality: of it only what trains is new (unless an earlier
    # run, init_from, replaced its weights: then all of it, as for any loaded modality)
    in_base = base_modalities(model) - set(model.loaded_modalities)
    return [g for g in groups if g.split(".", 1)[0] in kept
            and (g.split(".", 1)[0] not in in_base or any(p.requires_grad for p in groups[g].values()))]


BASE_MODALITIES = "base_modalities"  # attribute naming the modalities whose weights the base checkpoint holds


def base_modalities(model: MultimodalLlama) -> frozenset[str]:
    """The modalities `model`'s base checkpoint supplies (`image` when a run starts from a Llama 3.2 Vision
    checkpoint; empty for a text-only base). A run exports only the trained groups of these."""
    return frozenset(getattr(model, BASE_MODALITIES, ()))


_LEGACY_PREFIXES = (("encoder.", "image.encoder."), ("projector.", "image.projector."))
_LEGACY_BLOCK = re.compile(r"decoder\.layers\.(\d+)\.fusion\.(?!image\.)(.+)")
_LEGACY_ROWS = "decoder.tok_embeddings.fusion_embedding.weight"


def upgrade_adapter_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors saved before modalities were named (`encoder.*`, `projector.*`,
    `decoder.layers.i.fusion.*`, an 8-row `fusion_embedding`) under today's image names; current files
    pass through unchanged. Of the 8 old rows only row 0 (`<|image|>`) ever received a gradient."""
    if not any(k.startswith(("encoder.", "projector.")) or k == _LEGACY_ROWS for k in tensors):
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        else:
            if key == _LEGACY_ROWS:
                key, tensor = IMAGE_ROW_KEY, tensor[:1]
            elif (match := _LEGACY_BLOCK.fullmatch(key)) is not None:
                key = f"decoder.layers.{match.group(1)}.fusion.image.{match.group(2)}"
        out[key] = tensor
    return out


def save_adapter(model: MultimodalLlama, out_dir: str | Path, *, base_lm: str | Path,
                 groups: Sequence[str] | None = None) -> Path:
    """Write `adapter.safetensors` (the weights of `groups`, default every group but the LM's) and
    `config.yaml` (base LM path, the modalities and their settings), each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg: dict[str, Any] = {"base_lm": str(Path(base_lm).resolve()), "modalities": list(model.modality_names)}
    for modality in model.modalities.values():
        if isinstance(modality, ImageModality):
            run_cfg.update(encoder=modality.encoder_kind, vision=dataclasses.asdict(modality.vision_cfg),
                           fusion_layers=list(modality.fusion_layers))
        elif isinstance(modality, SpeechModality):
            run_cfg["speech"] = speech_config_fields(modality)
        elif isinstance(modality, VideoModality):
            run_cfg["video"] = video_config_fields(modality)
    run_cfg["n_fusion_tokens"] = model.n_media_tokens
    if (lora := lora_config_of(model)) is not None:
        run_cfg["lora"] = lora.to_fields()
    atomic_write(out / ADAPTER_FILE, safetensors_bytes(adapter_state_dict(model, groups), metadata={"format": "pt"}))
    atomic_write(out / RUN_CONFIG, yaml.safe_dump(run_cfg, sort_keys=False))
    return out


def read_adapter_run_config(directory: str | Path) -> dict[str, Any]:
    """`{base_lm, modalities, encoder, vision, fusion_layers, speech, video, n_fusion_tokens, lora}` of a run /
    export (`lora`: the LoRA settings, None without LoRA).

    `config.yaml` is either `save_adapter`'s own schema (those keys at the top level) or the training
    recipe `mm-llama train` writes (a `model:` section holding `base_lm`, the resolved `modalities`, the
    image settings `encoder`, `vision`, `fusion_layers`, the speech settings `speech` and the video settings
    `video`). Runs from before
    modalities were recorded are image runs. The image settings are needed only when `image` is among the
    modalities. `base_lm` is returned as written, `vision` without `weights` (the adapter file holds the
    encoder's weights).
    """
    directory = Path(directory)
    path = directory / RUN_CONFIG
    run_cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(run_cfg, dict):
        raise CheckpointError(f"{path} is not a mapping; expected save_adapter's config or a training recipe")
    where = f"{path} (a training recipe)"
    if isinstance(run_cfg.get("model"), dict):  # a training recipe (mm-llama train)
        model = run_cfg["model"]
        task = (run_cfg.get("data") or {}).get("task")
        if model.get("kind") == "llama":
            raise CheckpointError(f"{directory} is an LM pretraining run; its model is {directory / 'model'} "
                                  "(load it with load_llama or `mm-llama generate --checkpoint`)")
        if task == "contrastive":
            raise CheckpointError(f"{directory} is an image-encoder pretraining run; its product is "
                                  f"{directory / 'encoder.safetensors'} (use it as model.encoder_checkpoint of an "
                                  "image stage)")
    else:
        model, where = run_cfg, str(path)
    modalities = list(model.get("modalities") or ["image"])
    needed = ["base_lm"] + (["encoder", "vision", "fusion_layers"] if {"image", "video"} & set(modalities) else [])
    missing = [k for k in needed if not model.get(k) and model.get(k) != {}]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}; it was not written by save_adapter or "
                              "`mm-llama train`")
    fields = {"base_lm": model["base_lm"], "modalities": modalities, "encoder": model.get("encoder"),
              "vision": dict(model.get("vision") or {}), "fusion_layers": list(model.get("fusion_layers") or []),
              "speech": dict(model.get("speech") or {}), "video": dict(model.get("video") or {}),
              "n_fusion_tokens": model.get("n_fusion_tokens", 8), "lora": model.get("lora")}
    fields["vision"].pop("weights", None)
    return fields


def modalities_from_fields(text: LlamaConfig, fields: dict[str, Any]) -> list[Modality]:
    """The modalities `fields` (`read_adapter_run_config`'s, or a recipe's model section) describe, in the
    order they are named: `image` from `encoder` / `vision` / `fusion_layers` (empty: every 4th layer),
    `speech` from `speech` (`SpeechModality` presets or fields), `video` from `video` (it encodes frames
    with the image modality's encoder, so `image` must be named too)."""
    names = list(fields["modalities"])
    unknown = [n for n in names if n not in ("image", "speech", "video")]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; known: image, speech, video")
    if "video" in names and "image" not in names:
        raise ValueError("the video modality encodes frames with the image modality's encoder: name image too "
                         "(modalities: [image, video])")
    built: dict[str, Modality] = {}
    if "image" in names:
        layers = tuple(fields.get("fusion_layers") or fusion_schedule(text.n_layers, max(1, text.n_layers // 4)))
        built["image"] = ImageModality(text, vision_config_from_dict(fields["encoder"], fields["vision"]),
                                       encoder=fields["encoder"], fusion_layers=layers)
    if "speech" in names:
        built["speech"] = SpeechModality(text, *speech_configs(fields.get("speech") or {}))
    if "video" in names:
        aggregator, video_layers, frame_chunk = video_config(fields.get("video"))
        image = built["image"]
        assert isinstance(image, ImageModality)
        built["video"] = VideoModality(text, image, aggregator, fusion_layers=video_layers, frame_chunk=frame_chunk)
    return [built[n] for n in names]


def adapter_run_base_lm(directory: str | Path) -> Path:
    """The base LM directory a run / export names (relative paths: from the working directory, else from
    the run directory; an `lm_pretrain` run directory means its `model/` folder)."""
    directory = Path(directory)
    base = Path(read_adapter_run_config(directory)["base_lm"])
    candidates = [base] if base.is_absolute() else [base, directory / base]
    for candidate in candidates:
        if candidate.is_dir():
            return lm_checkpoint_dir(candidate)
    raise CheckpointError(
        f"{directory / RUN_CONFIG} names base LM {base}, which does not exist; point base_lm at the Llama "
        "checkpoint the adapter was trained on"
    )


def check_run_matches_vision_base(run_cfg: dict[str, Any], base_cfg: MultimodalConfig, run: Path, base: Path) -> None:
    """A run trained from a Llama 3.2 Vision checkpoint records that checkpoint's image settings; a
    CheckpointError names the first that differs (the base was replaced since the run, or the run is not
    from this base)."""
    if "image" not in run_cfg["modalities"]:
        raise CheckpointError(f"{run / RUN_CONFIG} names the Llama 3.2 Vision checkpoint {base} as its base but not the "
                              "image modality it brings; add image to its modalities")
    recorded = {"encoder": run_cfg["encoder"], "fusion_layers": list(run_cfg["fusion_layers"])}
    expected = {"encoder": base_cfg.encoder, "fusion_layers": list(base_cfg.fusion_layers)}
    try:
        recorded["vision"] = dataclasses.asdict(vision_config_from_dict(run_cfg["encoder"], run_cfg["vision"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{run / RUN_CONFIG}: its vision settings do not describe a Llama 3.2 Vision encoder "
                              f"({err}); the run was not trained from the base {base}") from err
    expected["vision"] = dataclasses.asdict(base_cfg.vision)
    for field in ("encoder", "fusion_layers", "vision"):
        if recorded[field] != expected[field]:
            if field == "vision":
                name = next(k for k in expected["vision"] if recorded["vision"].get(k) != expected["vision"][k])
                field, got, want = f"vision.{name}", recorded["vision"].get(name), expected["vision"][name]
            else:
                got, want = recorded[field], expected[field]
            raise CheckpointError(f"{run / RUN_CONFIG} records {field}={got} but its base {base} has {want}: the "
                                  "base is not the checkpoint the run was trained from; point base_lm at that one")


def load_adapter_run(
    directory: Path,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_seq_len: int | None = None,
) -> MultimodalLlama:
    """Base LM from the path `config.yaml` names, plus the adapter weights beside it (`config.yaml` in
    `save_adapter`'s schema or the recipe `mm-llama train` writes; see `read_adapter_run_config`)."""
    directory = Path(directory)
    run_cfg = read_adapter_run_config(directory)
    if not (directory / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{directory} has {RUN_CONFIG} but no {ADAPTER_FILE}; the run saved no adapter yet")
    base = adapter_run_base_lm(directory)
    base_tensors: Iterator[tuple[str, torch.Tensor]]
    if is_vision_checkpoint(base):  # a Llama 3.2 Vision base: trunk and image modality come from it
        base_cfg = vision_checkpoint_config(base)
        check_run_matches_vision_base(run_cfg, base_cfg, directory, base)
        text_cfg = base_cfg.text if max_seq_len is None else base_cfg.text.replace(max_seq_len=max_seq_len)
        base_tensors = vision_checkpoint_tensors(base, base_cfg)
    else:
        text_cfg = llama_config_from_dir(base, max_seq_len)
        base_tensors = ((f"decoder.{k}", v) for k, v in llama_tensors(base, text_cfg))
    with torch.device("meta"):
        model = MultimodalLlama(LlamaDecoder(text_cfg), modalities_from_fields(text_cfg, run_cfg),
                                n_media_tokens=int(run_cfg.get("n_fusion_tokens", 8)))
        if run_cfg["lora"]:  # the factors come from the adapter file
            apply_lora(model, LoraConfig.from_fields(run_cfg["lora"]))
    tensors: Iterator[tuple[str, torch.Tensor]] = itertools.chain(  # the adapter's tensors come last: they win
        base_tensors, upgrade_adapter_keys(dict(iter_safetensors([directory / ADAPTER_FILE]))).items(),
    )
    assign_state_dict(model, tensors, dtype=parse_dtype(dtype), device=device, source=str(directory))
    return model.eval()
