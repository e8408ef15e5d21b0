"""Tiny random `transformers.LlamaForCausalLM` models and a test-side HF → Meta converter.

The converter is written from the published layout (REFERENCE.md §1), independently of mm_llama's
loader, so a Meta-format test checks the loader against an outside expectation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# dim 64, Meta rule: int(2*4*64/3)=170; x1.3 -> 221; rounded up to a multiple of 32 -> 224.
META_FFN = {"multiple_of": 32, "ffn_dim_multiplier": 1.3, "intermediate_size": 224}

VARIANTS = {
    # GQA (4 query heads share 2 KV heads) with Llama 3.1 rope scaling, untied head.
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA31_ROPE,
                            tie_word_embeddings=False),
    # Scaling with a short original context, so the smooth band covers more frequencies.
    "gqa-short-context-rope": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_scaling={**LLAMA31_ROPE, "factor": 32.0,
                                                 "original_max_position_embeddings": 64}),
    # Llama 3.2 1B/3B style: tied embeddings; multi-query attention, default rope.
    "tied-default-rope": dict(num_attention_heads=4, num_key_value_heads=1, rope_scaling=None,
                              tie_word_embeddings=True),
}


def tiny_hf_llama(variant: str, *, vocab_size: int = 384, seed: int = 0) -> LlamaForCausalLM:
    """A random tiny HF Llama; weights drawn with std 0.2 so logits are far from ties."""
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=META_FFN["intermediate_size"],
        num_hidden_layers=2, max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **VARIANTS[variant],
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights too, so a wrong norm mapping cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows → Meta interleaved rows (inverse of the HF conversion script's permute)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, in_dim).permute(0, 2, 1, 3).reshape(out_dim, in_dim)


def hf_to_meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = model.state_dict()
    meta: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        meta |= {
            f"layers.{i}.attention.wq.weight": _unpermute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
            f"layers.{i}.attention.wk.weight": _unpermute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    meta["rope.freqs"] = torch.ones(head_dim // 2)  # present in Meta files, ignored by loaders
    return {k: v.clone() for k, v in meta.items()}


def _meta_split_dim(key: str) -> int | None:
    """Meta model parallelism: column-parallel on dim 0, row-parallel (wo, w2) on dim 1, norms replicated."""
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if key.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or key in (
        "output.weight", "tok_embeddings.weight"):
        return 0
    return None


def write_meta_checkpoint(model: LlamaForCausalLM, directory: Path, *, n_shards: int = 1) -> Path:
    """Write `consolidated.NN.pth` (split like Meta's model parallelism) + `params.json`."""
    cfg = model.config
    directory.mkdir(parents=True, exist_ok=True)
    meta = hf_to_meta_state_dict(model)
    for rank in range(n_shards):
        shard = {}
        for key, tensor in meta.items():
            dim = _meta_split_dim(key)
            shard[key] = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank].clone()
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    rope = cfg.rope_parameters if hasattr(cfg, "rope_parameters") else cfg.rope_scaling
    params = {
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
        "multiple_of": META_FFN["multiple_of"], "ffn_dim_multiplier": META_FFN["ffn_dim_multiplier"],
        "norm_eps": cfg.rms_norm_eps, "rope_theta": 500000.0,
        "use_scaled_rope": (rope or {}).get("rope_type") == "llama3",
    }
    (directory / "params.json").write_text(json.dumps(params))
    return directory
