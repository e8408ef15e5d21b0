"""Configs from HF config.json, Meta params.json and presets."""

from __future__ import annotations

import math

import pytest
import torch

from mm_llama import LlamaConfig, LlamaDecoder, RopeScaling, preset
from mm_llama.config import meta_ffn_dim
from mm_llama.rope import rope_inv_freq

HF_BASE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 100, "intermediate_size": 160, "max_position_embeddings": 512}
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def test_rope_scaling_and_rope_parameters_spellings_agree() -> None:
    old = LlamaConfig.from_hf_dict({**HF_BASE, "rope_theta": 500000.0, "rope_scaling": SCALING})
    new = LlamaConfig.from_hf_dict({**HF_BASE, "rope_parameters": {**SCALING, "rope_theta": 500000.0}})
    assert old == new
    assert old.rope_scaling == RopeScaling() and old.rope_theta == 500000.0


def test_default_rope_type_means_no_scaling() -> None:
    cfg = LlamaConfig.from_hf_dict({**HF_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e4


def test_missing_hf_field_is_named() -> None:
    bad = dict(HF_BASE)
    del bad["intermediate_size"]
    with pytest.raises(ValueError, match="missing the field 'intermediate_size'"):
        LlamaConfig.from_hf_dict(bad)


def test_meta_params_ffn_rule_matches_published_sizes() -> None:
    # Llama 3 8B: dim 4096, multiple_of 1024, multiplier 1.3 -> 14336; 70B: 8192, 4096, 1.3 -> 28672;
    # 405B: 16384, multiple_of 4096, multiplier 1.2 -> 53248 (REFERENCE.md §1).
    assert meta_ffn_dim(4096, 1024, 1.3) == 14336
    assert meta_ffn_dim(8192, 4096, 1.3) == 28672
    assert meta_ffn_dim(16384, 4096, 1.2) == 53248
    cfg = LlamaConfig.from_meta_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                                        "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
                                        "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True})
    assert cfg == preset("llama3.1-8b").replace(bos_token_id=None, eos_token_id=None) or (
        cfg.ffn_dim == 14336 and cfg.rope_scaling == RopeScaling() and cfg.max_seq_len == 131072)


def test_meta_params_round_trip() -> None:
    for name in ("llama3-8b", "llama3.1-405b", "tiny"):
        cfg = preset(name)
        back = LlamaConfig.from_meta_params(cfg.to_meta_params(), max_seq_len=cfg.max_seq_len)
        assert back.ffn_dim == cfg.ffn_dim and back.n_kv_heads == cfg.n_kv_heads


@pytest.mark.parametrize(
    ("name", "layers", "dim", "ffn", "heads", "kv", "params"),
    [
        ("llama3-8b", 32, 4096, 14336, 32, 8, 8_030_261_248),
        ("llama3-70b", 80, 8192, 28672, 64, 8, 70_553_706_496),
        ("llama3.1-405b", 126, 16384, 53248, 128, 8, None),
    ],
)
def test_presets_match_reference(name, layers, dim, ffn, heads, kv, params) -> None:
    cfg = preset(name)
    assert (cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        layers, dim, ffn, heads, kv, 128)
    assert cfg.vocab_size == 128256 and cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5
    if params is not None:  # published parameter counts, built on the meta device (no memory)
        with torch.device("meta"):
            model = LlamaDecoder(cfg)
        assert sum(p.numel() for p in model.parameters()) == params


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown preset 'llama9'.*llama3-8b"):
        preset("llama9")


def test_changing_dim_or_heads_derives_head_dim_again() -> None:
    assert preset("tiny").head_dim == 16
    assert preset("tiny", dim=128).head_dim == 32
    assert preset("tiny", n_heads=2, n_kv_heads=1).head_dim == 32
    assert preset("tiny", dim=128, head_dim=16).head_dim == 16  # explicit wins
    explicit = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, head_dim=8)
    assert explicit.replace(dim=128).head_dim == 8  # a head_dim set apart from dim // n_heads is kept


def test_gqa_needs_divisible_heads() -> None:
    with pytest.raises(ValueError, match="n_heads 6 must be a multiple of n_kv_heads 4"):
        preset("tiny", n_heads=6, n_kv_heads=4, head_dim=16)


def test_llama3_rope_scaling_three_bands_by_hand() -> None:
    head_dim, theta = 128, 500000.0
    base = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    scaled = rope_inv_freq(head_dim, theta, RopeScaling()).tolist()
    bands = set()
    for b, s in zip(base, scaled):
        wavelen = 2 * math.pi / b
        if wavelen < 8192 / 4:
            expected, band = b, "high"
        elif wavelen > 8192 / 1:
            expected, band = b / 8, "low"
        else:
            t = (8192 / wavelen - 1) / (4 - 1)
            expected, band = (1 - t) * b / 8 + t * b, "mid"
        bands.add(band)
        assert s == pytest.approx(expected, rel=1e-6)
    assert bands == {"high", "mid", "low"}
