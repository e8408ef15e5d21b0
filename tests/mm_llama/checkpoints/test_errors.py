"""Bad checkpoints raise errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm_llama.checkpoints import CheckpointError, load_llama
from tests.reference.hf_llama import tiny_hf_llama, write_meta_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_llama("gqa-llama3-rope").save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist.*does not exist"):
        load_llama(tmp_path / "does-not-exist")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither config.json .* nor params.json"):
        load_llama(tmp_path)


def test_config_without_weights(hf_dir: Path, tmp_path: Path) -> None:
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_llama(tmp_path)


def test_sharded_index_naming_an_absent_shard(tmp_path: Path) -> None:
    tiny_hf_llama("gqa-llama3-rope").save_pretrained(tmp_path, max_shard_size="60KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"not in .*{victim.name}"):
        load_llama(tmp_path)


def test_unknown_key(hf_dir: Path, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown key.*model\.layers\.0\.self_attn\.extra_proj\.weight"):
        load_llama(path)


def test_missing_key(hf_dir: Path, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.1\.feed_forward\.w3\.weight"):
        load_llama(path)


def test_shape_mismatch_names_key_and_both_shapes(hf_dir: Path, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.feed_forward\.w2\.weight' has shape \(64, 224\) .* expects \(64, 256\)"):
        load_llama(path)


def test_unsupported_rope_type(hf_dir: Path, tmp_path: Path) -> None:
    path = _copy(hf_dir, tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported rope type 'yarn'.*'default', 'llama3'"):
        load_llama(path)


def test_meta_missing_shard(tmp_path: Path) -> None:
    write_meta_checkpoint(tiny_hf_llama("gqa-llama3-rope"), tmp_path, n_shards=2)
    (tmp_path / "consolidated.00.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="not numbered 00..01.*a shard is missing"):
        load_llama(tmp_path)


def test_meta_params_mismatch(tmp_path: Path) -> None:
    write_meta_checkpoint(tiny_hf_llama("gqa-llama3-rope"), tmp_path, n_shards=2)
    params = json.loads((tmp_path / "params.json").read_text())
    params["n_kv_heads"] = 4
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wk\.weight.*\(16, 64\).*\(64, 64\)"):
        load_llama(tmp_path)


def test_unknown_dtype(hf_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_llama(hf_dir, dtype="float8")
