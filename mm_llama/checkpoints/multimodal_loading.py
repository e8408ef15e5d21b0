"""`load_multimodal` and adapter checkpoints: one call for any image-model directory.

Accepted directories: HF Mllama (`config.json` with `model_type: mllama`), Meta Llama 3.2 Vision
(`params.json` with `vision_chunk_size` + `consolidated.00.pth`), or an mm-llama run/export
(`config.yaml` naming the base LM + `adapter.safetensors` with only the trained weights).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors.torch import save_file

from mm_llama.checkpoints.files import config_errors, iter_safetensors, read_json_object
from mm_llama.checkpoints.loading import checkpoint_format, llama_config_from_dir, llama_tensors, parse_dtype
from mm_llama.checkpoints.mllama import load_hf_mllama_tensors, load_meta_mllama_tensors, text_config_from_hf
from mm_llama.checkpoints.state_dict import CheckpointError, assign_state_dict
from mm_llama.config import ConfigFields, LlamaConfig
from mm_llama.fusion import fusion_schedule
from mm_llama.multimodal import MultimodalConfig, MultimodalLlama

ADAPTER_FILE = "adapter.safetensors"
RUN_CONFIG = "config.yaml"


def vision_config_class(encoder: str) -> type:
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


def _build(cfg: MultimodalConfig) -> MultimodalLlama:
    with torch.device("meta"):
        return MultimodalLlama(cfg)


def _config_from_hf(directory: Path) -> tuple[MultimodalConfig, list[int]]:
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
        cfg = MultimodalConfig(text=text_cfg, vision=vision, encoder="mllama", fusion_layers=tuple(fusion))
    return cfg, list(text.data.get("cross_attention_layers") or [])


def _config_from_meta(directory: Path) -> MultimodalConfig:
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
    fmt = checkpoint_format(directory)
    if fmt == "hf":
        cfg, cross = _config_from_hf(directory)
        tensors = load_hf_mllama_tensors(directory, cfg.text, cross)
    else:
        cfg = _config_from_meta(directory)
        tensors = load_meta_mllama_tensors(directory, list(cfg.fusion_layers), cfg.vision)
    if max_seq_len is not None:
        cfg = dataclasses.replace(cfg, text=cfg.text.replace(max_seq_len=max_seq_len))
    model = _build(cfg)
    assign_state_dict(model, tensors, dtype=parse_dtype(dtype), device=device, source=str(directory))
    return model.eval()


# ---------------------------------------------------------------------------------------- adapters
def adapter_state_dict(model: MultimodalLlama) -> dict[str, torch.Tensor]:
    """The encoder and fusion weights (what adapter training changes), under state-dict names."""
    trained = {id(p) for group in ("encoder", "fusion") for p in model.parameter_groups()[group].values()}
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict(keep_vars=True).items() if id(v) in trained}


def save_adapter(model: MultimodalLlama, out_dir: str | Path, *, base_lm: str | Path) -> Path:
    """Write `adapter.safetensors` + `config.yaml` (base LM path, encoder config, fusion layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    run_cfg = {
        "base_lm": str(Path(base_lm).resolve()),
        "encoder": cfg.encoder,
        "vision": dataclasses.asdict(cfg.vision),
        "fusion_layers": list(cfg.fusion_layers),
        "n_fusion_tokens": cfg.n_fusion_tokens,
    }
    tmp = out / (ADAPTER_FILE + ".tmp")
    save_file(adapter_state_dict(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / ADAPTER_FILE)
    (out / RUN_CONFIG).write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    return out


def read_adapter_run_config(directory: str | Path) -> dict[str, Any]:
    """`{base_lm, encoder, vision, fusion_layers, n_fusion_tokens}` of a run / export directory.

    `config.yaml` is either `save_adapter`'s own schema (those keys at the top level) or the training
    recipe `mm-llama train` writes (a `model:` section holding `base_lm`, `encoder`, `vision` and the
    resolved `fusion_layers`). `base_lm` is returned as written, `vision` without `weights` (the adapter
    file holds the encoder's weights).
    """
    directory = Path(directory)
    path = directory / RUN_CONFIG
    run_cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(run_cfg, dict):
        raise CheckpointError(f"{path} is not a mapping; expected save_adapter's config or a training recipe")
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
        missing = [k for k in ("base_lm", "encoder", "vision") if not model.get(k) and model.get(k) != {}]
        if not model.get("fusion_layers"):
            missing.append("fusion_layers")
        if missing:
            raise CheckpointError(f"{path} (a training recipe) lacks model.{', model.'.join(missing)}; it was not "
                                  "written by `mm-llama train`")
        fields = {"base_lm": model["base_lm"], "encoder": model["encoder"], "vision": dict(model["vision"] or {}),
                  "fusion_layers": list(model["fusion_layers"]), "n_fusion_tokens": model.get("n_fusion_tokens", 8)}
    else:
        missing = [k for k in ("base_lm", "encoder", "vision", "fusion_layers") if k not in run_cfg]
        if missing:
            raise CheckpointError(f"{path} lacks {missing}; it was not written by save_adapter or mm-llama train")
        fields = {k: run_cfg[k] for k in ("base_lm", "encoder", "vision", "fusion_layers")}
        fields["vision"] = dict(fields["vision"] or {})
        fields["n_fusion_tokens"] = run_cfg.get("n_fusion_tokens", 8)
    fields["vision"].pop("weights", None)
    return fields


def adapter_run_base_lm(directory: str | Path) -> Path:
    """The base LM directory a run / export names (relative paths: from the working directory, else from
    the run directory; an `lm_pretrain` run directory means its `model/` folder)."""
    directory = Path(directory)
    base = Path(read_adapter_run_config(directory)["base_lm"])
    candidates = [base] if base.is_absolute() else [base, directory / base]
    for candidate in candidates:
        if candidate.is_dir():
            if not (candidate / "config.json").is_file() and not (candidate / "params.json").is_file() \
                    and (candidate / "model" / "config.json").is_file():
                return candidate / "model"
            return candidate
    raise CheckpointError(
        f"{directory / RUN_CONFIG} names base LM {base}, which does not exist; point base_lm at the Llama "
        "checkpoint the adapter was trained on"
    )


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
    text_cfg = llama_config_from_dir(base, max_seq_len)
    cfg = MultimodalConfig(
        text=text_cfg, vision=vision_config_from_dict(run_cfg["encoder"], run_cfg["vision"]),
        encoder=run_cfg["encoder"], fusion_layers=tuple(run_cfg["fusion_layers"]),
        n_fusion_tokens=int(run_cfg.get("n_fusion_tokens", 8)),
    )
    model = _build(cfg)
    tensors: Iterator[tuple[str, torch.Tensor]] = itertools.chain(
        ((f"decoder.{k}", v) for k, v in llama_tensors(base, text_cfg)),
        iter_safetensors([directory / ADAPTER_FILE]),
    )
    assign_state_dict(model, tensors, dtype=parse_dtype(dtype), device=device, source=str(directory))
    return model.eval()
