"""The files next to the weights that serving stacks read: tokenizer, chat template, generation settings
and (for an image model) the image processor's settings, in Hugging Face's layout.

* `tokenizer.json` — copied from the model's tokenizer, or converted from Meta's tiktoken
  `tokenizer.model`; for an image model `<|image|>` is listed as an added special token at the text
  vocabulary size, as in the published Llama 3.2 Vision repositories.
* `tokenizer_config.json`, `special_tokens_map.json` — BOS / EOS / pad names and the chat template.
* `chat_template.jinja` (and `chat_template.json` for older processors) — the Llama 3 chat format exactly
  as mm-llama trains and prompts (`mm_llama.data.prompts`): media first in the user turn, text stripped.
* `generation_config.json` — BOS, the stop ids (end_of_text, eom_id, eot_id), pad; greedy decoding.
* `preprocessor_config.json` — `MllamaImageProcessor`: tile size, max tiles, CLIP mean / std, bilinear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from mm_llama.atomic_file import atomic_write
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.tokenizer import HF_FILE, IMAGE_TOKEN, TIKTOKEN_FILE, Tokenizer, read_tiktoken_ranks

# The published Llama 3.2 Vision tokenizer.json entry for <|image|> (its id is the text vocabulary size).
IMAGE_ENTRY = {"content": IMAGE_TOKEN, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
               "special": True}

# mm-llama's prompt layout (`data.prompts.chat_prompt_ids`): BOS, then per message a header, the content
# (images first as <|image|>, text stripped) and <|eot_id|>; an open assistant header to generate.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] | trim }}"
    "{%- else %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{- '<|image|>' }}{%- endfor %}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') | trim }}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def tokenizer_spec(source: Path) -> dict[str, Any]:
    """The `tokenizer.json` of the tokenizer in directory `source` (converted from `tokenizer.model` when
    that is all there is) as a dict."""
    if (source / HF_FILE).is_file():
        return json.loads((source / HF_FILE).read_text(encoding="utf-8"))
    if (source / TIKTOKEN_FILE).is_file():
        from mm_llama.tokenizer_training import _build_hf_tokenizer  # tiktoken ranks → the same BPE as tokenizers

        return json.loads(_build_hf_tokenizer(read_tiktoken_ranks(source / TIKTOKEN_FILE)).to_str())
    raise CheckpointError(f"no {HF_FILE} or {TIKTOKEN_FILE} in {source}; an export needs the model's tokenizer "
                          "(copy it next to the model or its base LM)")


def with_image_token(spec: dict[str, Any], image_id: int, source: Path) -> dict[str, Any]:
    """`spec` listing `<|image|>` as the special added token `image_id` (the LM's vocabulary size)."""
    added = list(spec.get("added_tokens") or [])
    listed = [t for t in added if t.get("content") == IMAGE_TOKEN]
    if listed:
        if listed[0]["id"] != image_id:
            raise CheckpointError(f"the tokenizer in {source} lists {IMAGE_TOKEN} as id {listed[0]['id']} but the model's "
                                  f"image token is {image_id} (its text vocabulary size); use the model's own tokenizer")
        return spec
    taken = max([*spec["model"]["vocab"].values(), *(t["id"] for t in added)]) + 1
    if taken != image_id:
        raise CheckpointError(f"the tokenizer in {source} has {taken} ids but the model's text vocabulary is {image_id}; "
                              f"{IMAGE_TOKEN} must follow the tokenizer's last id as the model's image token, so the two "
                              "must be the same size: use the model's own tokenizer")
    return dict(spec, added_tokens=added + [{"id": image_id, **IMAGE_ENTRY}])


def write_tokenizer_files(source: Path, out: Path, *, image_id: int | None, chat: bool, max_len: int) -> Tokenizer:
    """`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` and the chat template files in
    `out`, from the tokenizer in `source`. `image_id`: list `<|image|>` at that id (an image model); `chat`:
    EOS is `<|eot_id|>` (a model trained on chat turns) rather than `<|end_of_text|>`. Returns the written
    tokenizer as mm-llama reads it."""
    spec = tokenizer_spec(source)
    if image_id is not None:
        spec = with_image_token(spec, image_id, source)
    atomic_write(out / HF_FILE, json.dumps(spec, ensure_ascii=False))
    tok = Tokenizer.from_tokenizer_json(out / HF_FILE)
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>" if chat else "<|end_of_text|>"}
    if tok.pad_id is not None:
        names["pad_token"] = "<|finetune_right_pad_id|>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "model_input_names": ["input_ids", "attention_mask"],
              "clean_up_tokenization_spaces": True, "model_max_length": max_len, "chat_template": CHAT_TEMPLATE}
    atomic_write(out / "tokenizer_config.json", _json(config))
    atomic_write(out / "special_tokens_map.json", _json(names))
    atomic_write(out / "chat_template.jinja", CHAT_TEMPLATE)
    atomic_write(out / "chat_template.json", _json({"chat_template": CHAT_TEMPLATE}))
    return tok


def generation_config(bos_id: int, stop_ids: list[int], pad_id: int | None) -> dict[str, Any]:
    """`generation_config.json`: greedy, as mm-llama's commands decode by default."""
    config: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else stop_ids,
                              "do_sample": False}
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    return config


def write_generation_config(out: Path, *, bos_id: int, stop_ids: list[int], pad_id: int | None) -> None:
    atomic_write(out / "generation_config.json", _json(generation_config(bos_id, stop_ids, pad_id)))


def tokenizer_generation_ids(tok: Tokenizer) -> dict[str, Any]:
    """`write_generation_config`'s keyword arguments from a tokenizer (its stop ids in id order)."""
    return {"bos_id": tok.bos_id, "stop_ids": sorted(tok.stop_ids), "pad_id": tok.pad_id}


def write_preprocessor_config(out: Path, *, tile_size: int, max_tiles: int, mean: Sequence[float] | None = None,
                              std: Sequence[float] | None = None) -> None:
    """`preprocessor_config.json` for `MllamaImageProcessor`, with mm-llama's image transform: `mean` / `std`
    (default CLIP's; a source checkpoint's own ones are passed on), bilinear resizing, tiles of `tile_size`,
    at most `max_tiles`."""
    from mm_llama.data.image_transform import CLIP_MEAN, CLIP_STD

    config = {
        "image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(CLIP_MEAN if mean is None else mean), "image_std": list(CLIP_STD if std is None else std),
        "max_image_tiles": max_tiles,
        "resample": 2,  # PIL.Image.BILINEAR
        "rescale_factor": 1 / 255, "size": {"height": tile_size, "width": tile_size},
    }
    atomic_write(out / "preprocessor_config.json", _json(config))


__all__ = [
    "CHAT_TEMPLATE", "generation_config", "tokenizer_generation_ids", "tokenizer_spec", "with_image_token",
    "write_generation_config", "write_preprocessor_config", "write_tokenizer_files",
]
