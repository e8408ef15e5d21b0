"""Malformed config.json / params.json: one CheckpointError line naming the file, the field, the value and
what was expected (never an AttributeError, TypeError or a negative-dimension RuntimeError)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from mm_llama.checkpoints import CheckpointError, load_llama
from mm_llama.checkpoints.multimodal_loading import load_multimodal
from tests.mm_llama.checkpoints.broken import edit_json


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return change


POSITIVE = "expected a positive integer"
FINITE = r"expected a finite number > 0"

HF_CASES = [
    # 1. lists where objects belong
    ("config-is-a-list", lambda cfg: [cfg], r"config\.json holds \[\{.*\(list\); expected a JSON object"),
    ("rope_scaling-list", _set("rope_scaling", [8.0, 1.0]),
     r"config\.json: 'rope_scaling' is \[8\.0, 1\.0\] \(list\); expected a JSON object"),
    ("rope_parameters-list", _set("rope_parameters", ["llama3"]),
     r"config\.json: 'rope_parameters' is \[\"llama3\"\] \(list\); expected a JSON object"),
    # 2. zero and negative sizes
    ("hidden_size-negative", _set("hidden_size", -4), rf"config\.json: 'hidden_size' is -4 \(int\); {POSITIVE}"),
    ("layers-negative", _set("num_hidden_layers", -1), rf"'num_hidden_layers' is -1 \(int\); {POSITIVE}"),
    ("heads-zero", _set("num_attention_heads", 0), rf"'num_attention_heads' is 0 \(int\); {POSITIVE}"),
    ("kv-heads-zero", _set("num_key_value_heads", 0), rf"'num_key_value_heads' is 0 \(int\); {POSITIVE}"),
    ("ffn-zero", _set("intermediate_size", 0), rf"'intermediate_size' is 0 \(int\); {POSITIVE}"),
    ("vocab-negative", _set("vocab_size", -384), rf"'vocab_size' is -384 \(int\); {POSITIVE}"),
    ("head_dim-negative", _set("head_dim", -16), rf"'head_dim' is -16 \(int\); {POSITIVE}"),
    ("max-positions-zero", _set("max_position_embeddings", 0), rf"'max_position_embeddings' is 0 \(int\); {POSITIVE}"),
    # 3. numbers of the wrong type, non-finite floats
    ("hidden_size-str", _set("hidden_size", "64"), rf"config\.json: 'hidden_size' is \"64\" \(str\); {POSITIVE}"),
    ("hidden_size-float", _set("hidden_size", 64.0), rf"'hidden_size' is 64\.0 \(float\); {POSITIVE}"),
    ("hidden_size-bool", _set("hidden_size", True), rf"'hidden_size' is true \(bool\); {POSITIVE}"),
    ("vocab-str", _set("vocab_size", "384"), rf"'vocab_size' is \"384\" \(str\); {POSITIVE}"),
    ("eps-str", _set("rms_norm_eps", "1e-5"), rf"'rms_norm_eps' is \"1e-5\" \(str\); {FINITE}"),
    ("eps-nan", _set("rms_norm_eps", float("nan")), rf"'rms_norm_eps' is NaN \(float\); {FINITE}"),
    ("theta-inf", _set("rope_theta", float("inf")), rf"'rope_theta' is Infinity \(float\); {FINITE}"),
    ("theta-negative", _set("rope_theta", -1.0), rf"'rope_theta' is -1\.0 \(float\); {FINITE}"),
    ("rope-factor-str", _set("rope_scaling.factor", "8"), rf"'rope_scaling\.factor' is \"8\" \(str\); {FINITE}"),
    ("rope-original-float", _set("rope_scaling.original_max_position_embeddings", 64.5),
     rf"'rope_scaling\.original_max_position_embeddings' is 64\.5 \(float\); {POSITIVE}"),
    ("tie-str", _set("tie_word_embeddings", "false"),
     r"'tie_word_embeddings' is \"false\" \(str\); expected true or false"),
    ("eos-str", _set("eos_token_id", "2"), r"'eos_token_id' is \"2\" \(str\); expected a token id"),
]

META_CASES = [
    ("params-is-a-list", lambda p: [p], r"params\.json holds \[\{.*\(list\); expected a JSON object"),
    ("dim-negative", _set("dim", -4), rf"params\.json: 'dim' is -4 \(int\); {POSITIVE}"),
    ("n_layers-negative", _set("n_layers", -1), rf"params\.json: 'n_layers' is -1 \(int\); {POSITIVE}"),
    ("n_heads-zero", _set("n_heads", 0), rf"params\.json: 'n_heads' is 0 \(int\); {POSITIVE}"),
    ("multiple_of-zero", _set("multiple_of", 0), rf"'multiple_of' is 0 \(int\); {POSITIVE}"),
    ("dim-str", _set("dim", "64"), rf"params\.json: 'dim' is \"64\" \(str\); {POSITIVE}"),
    ("dim-float", _set("dim", 64.0), rf"'dim' is 64\.0 \(float\); {POSITIVE}"),
    ("n_heads-bool", _set("n_heads", True), rf"'n_heads' is true \(bool\); {POSITIVE}"),
    ("vocab-str", _set("vocab_size", "384"), rf"'vocab_size' is \"384\" \(str\); {POSITIVE}"),
    ("ffn-multiplier-str", _set("ffn_dim_multiplier", "1.3"), rf"'ffn_dim_multiplier' is \"1\.3\" \(str\); {FINITE}"),
    ("norm_eps-inf", _set("norm_eps", float("inf")), rf"'norm_eps' is Infinity \(float\); {FINITE}"),
    ("rope_theta-str", _set("rope_theta", "5e5"), rf"'rope_theta' is \"5e5\" \(str\); {FINITE}"),
    ("scaled-rope-str", _set("use_scaled_rope", "yes"),
     r"'use_scaled_rope' is \"yes\" \(str\); expected true or false"),
]


def _broken(src: Path, dst: Path, file: str, change: Callable[[dict[str, Any]], Any]) -> Path:
    shutil.copytree(src, dst)
    edit_json(dst / file, change)
    return dst


def _raises_one_line(load: Callable[[Path], Any], path: Path, pattern: str) -> str:
    with pytest.raises(CheckpointError, match=pattern) as info:
        load(path)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(("change", "pattern"), [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_bad_hf_config_field(hf_dir: Path, tmp_path: Path, change: Callable, pattern: str) -> None:
    _raises_one_line(load_llama, _broken(hf_dir, tmp_path / "ckpt", "config.json", change), pattern)


@pytest.mark.parametrize(("change", "pattern"), [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_bad_meta_params_field(meta_dir: Path, tmp_path: Path, change: Callable, pattern: str) -> None:
    _raises_one_line(load_llama, _broken(meta_dir, tmp_path / "ckpt", "params.json", change), pattern)


@pytest.mark.parametrize(
    ("file", "text", "pattern"),
    [
        ("config.json", '{"hidden_size": 64,', r"config\.json is not valid JSON: .* at line 1, column 20"),
        ("config.json", '{\n  "hidden_size": 64\n  "vocab_size": 4\n}',
         r"config\.json is not valid JSON: .* line 3, column 3"),
        ("config.json", "", r"config\.json is not valid JSON: Expecting value at line 1, column 1"),
        ("params.json", '{"dim": 64 "n_layers": 2}', r"params\.json is not valid JSON: .* at line 1, column 12"),
    ],
    ids=["config-unterminated", "config-missing-comma", "config-empty", "params-missing-comma"],
)
def test_malformed_json_names_file_line_and_column(
    hf_dir: Path, meta_dir: Path, tmp_path: Path, file: str, text: str, pattern: str
) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(hf_dir if file == "config.json" else meta_dir, path)
    (path / file).write_text(text)
    _raises_one_line(load_llama, path, pattern)


def test_binary_config_is_named(hf_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(hf_dir, path)
    (path / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    _raises_one_line(load_llama, path, r"config\.json is not UTF-8 text \(byte 0x89 at offset 0\)")


def test_float_fields_accept_json_integers(hf_dir: Path, tmp_path: Path) -> None:
    path = _broken(hf_dir, tmp_path / "ckpt", "config.json", _set("rope_theta", 500000))
    assert load_llama(path).cfg.rope_theta == 500000.0


# ---------------------------------------------------------------------------------------- Mllama
MLLAMA_CASES = [
    ("text_config-list", _set("text_config", [1]),
     r"config\.json: 'text_config' is \[1\] \(list\); expected a JSON object"),
    ("vision_config-str", _set("vision_config", "vit"),
     r"config\.json: 'vision_config' is \"vit\" \(str\); expected a JSON"),
    ("text-hidden_size-str", _set("text_config.hidden_size", "64"),
     rf"config\.json: 'text_config\.hidden_size' is \"64\" \(str\); {POSITIVE}"),
    ("text-layers-negative", _set("text_config.num_hidden_layers", -6),
     rf"config\.json: 'text_config\.num_hidden_layers' is -6 \(int\); {POSITIVE}"),
    ("text-rope-list", _set("text_config.rope_parameters", [1]),
     r"'text_config\.rope_parameters' is \[1\] \(list\); expected a JSON object"),
    ("cross-layers-str", _set("text_config.cross_attention_layers", ["1"]),
     r"'text_config\.cross_attention_layers' is \[\"1\"\] \(list\); expected distinct layer indices in 0\.\.5"),
    ("cross-layers-out-of-range", _set("text_config.cross_attention_layers", [1, 9]),
     r"'text_config\.cross_attention_layers' is \[1, 9\] \(list\); expected distinct layer indices"),
    ("vision-hidden_size-str", _set("vision_config.hidden_size", "32"),
     rf"config\.json: 'vision_config\.hidden_size' is \"32\" \(str\); {POSITIVE}"),
    ("vision-layers-negative", _set("vision_config.num_hidden_layers", -4),
     rf"config\.json: 'vision_config\.num_hidden_layers' is -4 \(int\); {POSITIVE}"),
    ("vision-heads-float", _set("vision_config.attention_heads", 4.0),
     rf"'vision_config\.attention_heads' is 4\.0 \(float\); {POSITIVE}"),
    ("vision-image_size-list", _set("vision_config.image_size", [28, 56]),
     r"'vision_config\.image_size' is \[28, 56\] \(list\); expected a square size"),
    ("vision-taps-str", _set("vision_config.intermediate_layers_indices", ["1"]),
     r"'vision_config\.intermediate_layers_indices' is \[\"1\"\] \(list\); expected a list of layer indices"),
    ("vision-eps-nan", _set("vision_config.norm_eps", float("nan")),
     rf"'vision_config\.norm_eps' is NaN \(float\); {FINITE}"),
]


@pytest.mark.parametrize(("change", "pattern"), [c[1:] for c in MLLAMA_CASES], ids=[c[0] for c in MLLAMA_CASES])
def test_bad_mllama_config_field(mllama_dir: Path, tmp_path: Path, change: Callable, pattern: str) -> None:
    _raises_one_line(load_multimodal, _broken(mllama_dir, tmp_path / "ckpt", "config.json", change), pattern)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (_set("vision_chunk_size", "28"), rf"params\.json: 'vision_chunk_size' is \"28\" \(str\); {POSITIVE}"),
        (_set("vision_num_cross_attention_layers", 2.0),
         rf"params\.json: 'vision_num_cross_attention_layers' is 2\.0 \(float\); {POSITIVE}"),
        (_set("vision_encoder", [1]), r"params\.json: 'vision_encoder' is \[1\] \(list\); expected a JSON object"),
        (_set("dim", -64), rf"params\.json: 'dim' is -64 \(int\); {POSITIVE}"),
        (_set("vision_encoder", {"width": "32"}), r"params\.json: VisionConfig\.width must be an integer >= 1, got '32'"),
    ],
    ids=["chunk-size-str", "cross-layers-float", "vision-encoder-list", "dim-negative", "vision-encoder-width-str"],
)
def test_bad_meta_mllama_params_field(meta_mllama_dir: Path, tmp_path: Path, change: Callable, pattern: str) -> None:
    _raises_one_line(load_multimodal, _broken(meta_mllama_dir, tmp_path / "ckpt", "params.json", change), pattern)


def test_mllama_config_that_is_a_list(mllama_dir: Path, tmp_path: Path) -> None:
    path = _broken(mllama_dir, tmp_path / "ckpt", "config.json", lambda cfg: [cfg])
    _raises_one_line(load_multimodal, path, r"config\.json holds \[\{.*\(list\); expected a JSON object")


def test_valid_checkpoints_still_load(hf_dir: Path, meta_dir: Path) -> None:
    for path in (hf_dir, meta_dir):
        cfg = load_llama(path).cfg
        assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (64, 2, 4, 2, 384)
