"""Damaged weight files: one CheckpointError line naming the file or tensor (never a raw SafetensorError,
PytorchStreamReader RuntimeError, view-shape RuntimeError), non-float and non-finite tensors refused at load,
and sharded indexes that point outside their directory refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mm_llama.checkpoints import CheckpointError, load_llama, save_hf
from mm_llama.checkpoints.multimodal_loading import load_multimodal
from tests.mm_llama.checkpoints.broken import edit_json, edit_pth, edit_safetensors, tiny_model


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(tiny_model(), tmp_path_factory.mktemp("sharded"), max_shard_bytes=150_000)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _raises_one_line(load: Callable[[Path], Any], path: Path, pattern: str, **kwargs: Any) -> str:
    with pytest.raises(CheckpointError, match=pattern) as info:
        load(path, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


# ------------------------------------------------------------------ 4. damaged .safetensors
SAFETENSORS_DAMAGE = {
    "empty": (lambda f: f.write_bytes(b""), "header too small"),
    "truncated": (_truncate, "incomplete metadata, file not fully covered"),
    "header-only": (lambda f: f.write_bytes(f.read_bytes()[:20]), "invalid header length"),
    "garbage": (lambda f: f.write_bytes(b"this is not a safetensors file " * 40), "header too large"),
    "bad-header-json": (lambda f: f.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops!!}"), "invalid JSON in header"),
}


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE)
def test_damaged_safetensors_names_the_file(hf_dir: Path, tmp_path: Path, damage: str) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    hurt, reason = SAFETENSORS_DAMAGE[damage]
    hurt(path / "model.safetensors")
    _raises_one_line(load_llama, path, rf"ckpt/model\.safetensors: not a readable safetensors file \(.*{reason}.*\); "
                                       "it is empty, truncated or damaged")


def test_damaged_mllama_safetensors_names_the_file(mllama_dir: Path, tmp_path: Path) -> None:
    path = _copy(mllama_dir, tmp_path / "ckpt")
    victim = sorted(path.glob("*.safetensors"))[-1]
    _truncate(victim)
    _raises_one_line(load_multimodal, path, rf"{victim.name}: not a readable safetensors file")


# ------------------------------------------------------------------ 5. damaged consolidated.00.pth
class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this would have run",))


PTH_DAMAGE = {
    "empty": (lambda f: f.write_bytes(b""), r"not a readable PyTorch checkpoint"),
    "truncated": (_truncate, r"not a readable PyTorch checkpoint"),
    "truncated-end": (lambda f: f.write_bytes(f.read_bytes()[:-100]), r"not a readable PyTorch checkpoint"),
    "garbage": (lambda f: f.write_bytes(b"garbage" * 500), r"not a readable PyTorch checkpoint"),
    "runs-code": (lambda f: torch.save({"tok_embeddings.weight": _RunsCode()}, f),
                  r"refused to load: it holds Python objects other than tensors.*print"),
    "a-list": (lambda f: torch.save([torch.zeros(2)], f), r"holds a list; expected a dict of tensor name -> tensor"),
    "nested": (lambda f: torch.save({"model": {"w": torch.zeros(2)}}, f), r"entry 'model' is a dict, not a tensor"),
}


@pytest.mark.parametrize("damage", PTH_DAMAGE)
def test_damaged_consolidated_names_the_file(meta_dir: Path, tmp_path: Path, damage: str) -> None:
    path = _copy(meta_dir, tmp_path / "ckpt")
    hurt, pattern = PTH_DAMAGE[damage]
    hurt(path / "consolidated.00.pth")
    _raises_one_line(load_llama, path, rf"ckpt/consolidated\.00\.pth.*{pattern}")


@pytest.mark.parametrize("damage", ["truncated", "runs-code"])
def test_damaged_meta_mllama_consolidated(meta_mllama_dir: Path, tmp_path: Path, damage: str) -> None:
    path = _copy(meta_mllama_dir, tmp_path / "ckpt")
    hurt, pattern = PTH_DAMAGE[damage]
    hurt(path / "consolidated.00.pth")
    _raises_one_line(load_multimodal, path, rf"consolidated\.00\.pth.*{pattern}")


# ------------------------------------------------------------------ 6. q/k shapes the RoPE un-permutation cannot take
@pytest.mark.parametrize(
    ("hf_key", "shape", "heads"),
    [("model.layers.0.self_attn.q_proj.weight", (12, 64), 4), ("model.layers.1.self_attn.k_proj.weight", (6, 64), 2),
     ("model.layers.0.self_attn.q_proj.weight", (64,), 4)],
    ids=["wq-rows", "wk-rows", "wq-1d"],
)
def test_qk_shape_checked_before_unpermuting(
    hf_dir: Path, tmp_path: Path, hf_key: str, shape: tuple[int, ...], heads: int
) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    edit_safetensors(path / "model.safetensors", lambda t: t.__setitem__(hf_key, torch.zeros(shape)))
    pattern = (rf"ckpt: tensor '{hf_key}' has shape \({shape[0]},( 64)?\), which cannot be a q/k projection of "
               rf"{heads} heads .*the config expects \({heads * 16}, 64\)\); does config\.json match")
    _raises_one_line(load_llama, path, pattern)


def test_mllama_q_shape_checked_before_unpermuting(mllama_dir: Path, tmp_path: Path) -> None:
    path = _copy(mllama_dir, tmp_path / "ckpt")
    for file in path.glob("*.safetensors"):
        def change(t: dict[str, torch.Tensor]) -> None:
            for key in [k for k in t if k.endswith("layers.0.self_attn.q_proj.weight")]:
                t[key] = torch.zeros(12, 64)
        edit_safetensors(file, change)
    _raises_one_line(load_multimodal, path, r"layers\.0\.self_attn\.q_proj\.weight' has shape \(12, 64\).*4 heads")


# ------------------------------------------------------------------ 7. integer / bool weights
@pytest.mark.parametrize(("hf_key", "ours", "dtype"), [
    ("model.norm.weight", "norm.weight", torch.int32),
    ("model.layers.0.input_layernorm.weight", "layers.0.attention_norm.weight", torch.bool),
    ("model.embed_tokens.weight", "tok_embeddings.weight", torch.int64),
])
def test_integer_weights_are_refused(hf_dir: Path, tmp_path: Path, hf_key: str, ours: str, dtype: torch.dtype) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    edit_safetensors(path / "model.safetensors", lambda t: t.__setitem__(hf_key, t[hf_key].to(dtype)))
    name = str(dtype).removeprefix("torch.")
    _raises_one_line(load_llama, path, rf"tensor '{ours}' has dtype {name}; expected floating point weights")


def test_integer_weights_are_refused_meta(meta_dir: Path, tmp_path: Path) -> None:
    path = _copy(meta_dir, tmp_path / "ckpt")
    key = "layers.1.attention.wv.weight"
    edit_pth(path / "consolidated.00.pth", lambda t: t.__setitem__(key, t[key].to(torch.int8)))
    _raises_one_line(load_llama, path, rf"tensor '{key}' has dtype int8; expected floating point weights")


# ------------------------------------------------------------------ 8. sharded index pointing outside
INDEX = "model.safetensors.index.json"


def _first_shard(index: dict[str, Any]) -> str:
    return sorted(set(index["weight_map"].values()))[0]


def test_index_entry_with_dotdot_is_refused(sharded_dir: Path, tmp_path: Path) -> None:
    path = _copy(sharded_dir, tmp_path / "ckpt")
    shard = _first_shard(json.loads((path / INDEX).read_text()))
    shutil.copy(path / shard, tmp_path / "outside.safetensors")  # the old loader would have read this file
    edit_json(path / INDEX, lambda d: d.update(weight_map={k: "../outside.safetensors" if v == shard else v
                                                          for k, v in d["weight_map"].items()}))
    _raises_one_line(load_llama, path, r"model\.safetensors\.index\.json: weight_map entry '.*' names shard "
                                       r"'\.\./outside\.safetensors', outside the checkpoint directory")


def test_index_entry_with_absolute_path_is_refused(sharded_dir: Path, tmp_path: Path) -> None:
    path = _copy(sharded_dir, tmp_path / "ckpt")
    shard = _first_shard(json.loads((path / INDEX).read_text()))
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(path / shard, elsewhere)
    edit_json(path / INDEX, lambda d: d.update(weight_map={k: str(elsewhere) if v == shard else v
                                                          for k, v in d["weight_map"].items()}))
    _raises_one_line(load_llama, path, rf"index\.json: weight_map entry .* names shard '{elsewhere}', outside")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda d: d.update(weight_map=[["a", "b"]]),
         r"'weight_map' is \[\[\"a\", \"b\"\]\] \(list\); expected a non-empty object"),
        (lambda d: d.update(weight_map={"model.norm.weight": 3}),
         r"weight_map entry 'model\.norm\.weight' is 3 \(int\); expected a shard file name"),
        (lambda d: d.update(weight_map={"model.norm.weight": None}),
         r"weight_map entry 'model\.norm\.weight' is null; expected a shard file name"),
        (lambda d: [d], r"index\.json holds \[\{.*\(list\); expected a JSON object"),
    ],
    ids=["list", "int-value", "null-value", "index-list"],
)
def test_malformed_weight_map(sharded_dir: Path, tmp_path: Path, change: Callable, pattern: str) -> None:
    path = _copy(sharded_dir, tmp_path / "ckpt")
    edit_json(path / INDEX, change)
    _raises_one_line(load_llama, path, pattern)


def test_malformed_index_json(sharded_dir: Path, tmp_path: Path) -> None:
    path = _copy(sharded_dir, tmp_path / "ckpt")
    (path / INDEX).write_text('{"weight_map": {"a": "b",}}')
    _raises_one_line(load_llama, path, r"index\.json is not valid JSON: .* at line 1, column 26")


def test_symlinked_shards_still_load(sharded_dir: Path, tmp_path: Path) -> None:
    """The Hugging Face cache keeps snapshot files as symlinks to ../../blobs; those must keep working."""
    path = _copy(sharded_dir, tmp_path / "snapshots" / "rev")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in path.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(Path("../..") / "blobs" / shard.name)
    assert load_llama(path).cfg.dim == 64


# ------------------------------------------------------------------ 9. NaN / Inf weights
def _poison(t: dict[str, torch.Tensor], key: str, value: float) -> None:
    t[key] = t[key].clone()
    t[key].view(-1)[3] = value


def test_non_finite_weights_are_named_hf(hf_dir: Path, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    def change(t: dict[str, torch.Tensor]) -> None:
        _poison(t, "model.embed_tokens.weight", float("nan"))
        _poison(t, "model.layers.1.self_attn.o_proj.weight", float("inf"))
    edit_safetensors(path / "model.safetensors", change)
    _raises_one_line(load_llama, path, r"ckpt: 2 tensor\(s\) hold NaN or Inf values: layers\.1\.attention\.wo\.weight, "
                                       r"tok_embeddings\.weight; the checkpoint is damaged")


def test_non_finite_weights_are_named_meta(meta_dir: Path, tmp_path: Path) -> None:
    path = _copy(meta_dir, tmp_path / "ckpt")
    def change(t: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            for name in ("wq", "wk", "wv", "wo"):
                _poison(t, f"layers.{i}.attention.{name}.weight", float("-inf"))
    edit_pth(path / "consolidated.00.pth", change)
    _raises_one_line(load_llama, path, r"8 tensor\(s\) hold NaN or Inf values: layers\.0\.attention\.wk\.weight, "
                                       r".*, … \(3 more\)")


def test_overflow_in_the_load_dtype_is_explained(hf_dir: Path, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    edit_safetensors(path / "model.safetensors", lambda t: _poison(t, "model.norm.weight", 1e6))
    pattern = r"norm\.weight \(finite as float32, overflows float16; load in bfloat16 or float32\)"
    _raises_one_line(load_llama, path, pattern, dtype="float16")


def test_non_finite_weights_are_named_multimodal(mllama_dir: Path, tmp_path: Path) -> None:
    path = _copy(mllama_dir, tmp_path / "ckpt")
    for file in path.glob("*.safetensors"):
        def change(t: dict[str, torch.Tensor]) -> None:
            poisoned = ("multi_modal_projector.weight", "vision_model.layernorm_pre.weight")
            for key in [k for k in t if k.endswith(poisoned)]:
                _poison(t, key, float("nan"))
        edit_safetensors(file, change)
    _raises_one_line(load_multimodal, path,
                     r"2 tensor\(s\) hold NaN or Inf values: image\.encoder\..*, image\.projector\.weight")
