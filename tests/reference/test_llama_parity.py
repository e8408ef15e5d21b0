"""Parity with `transformers.LlamaForCausalLM`: HF safetensors (single, sharded) and Meta consolidated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_llama.checkpoints import load_llama, save_hf
from mm_llama.generation import GenerationConfig, generate
from tests.reference.hf_llama import VARIANTS, tiny_hf_llama, write_meta_checkpoint

TOL = 1e-4


def _tokens(vocab: int, batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _max_logit_diff(hf_model, ours, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens)
    return (expected - got).abs().max().item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("max_shard_size", [None, "60KB"], ids=["single-file", "sharded"])
def test_hf_safetensors_logits_match(variant: str, max_shard_size: str | None, tmp_path: Path) -> None:
    hf_model = tiny_hf_llama(variant)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_model.save_pretrained(tmp_path, **kwargs)
    files = {p.name for p in tmp_path.iterdir()}
    assert ("model.safetensors.index.json" in files) == (max_shard_size is not None)

    ours = load_llama(tmp_path)
    assert _max_logit_diff(hf_model, ours, _tokens(hf_model.config.vocab_size)) <= TOL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_32_greedy_tokens_identical(variant: str, tmp_path: Path) -> None:
    hf_model = tiny_hf_llama(variant)
    hf_model.save_pretrained(tmp_path)
    ours = load_llama(tmp_path)
    prompt = _tokens(hf_model.config.vocab_size, batch=1, length=9)
    with torch.no_grad():
        expected = hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
            min_new_tokens=32, eos_token_id=None, pad_token_id=0,
        )[0, prompt.shape[1]:].tolist()
    got = generate(ours, [prompt[0].tolist()], GenerationConfig(max_new_tokens=32))[0].tokens
    assert len(expected) == 32
    assert got == expected


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("variant", ["gqa-llama3-rope", "tied-default-rope"])
def test_meta_consolidated_logits_match(variant: str, n_shards: int, tmp_path: Path) -> None:
    hf_model = tiny_hf_llama(variant)
    write_meta_checkpoint(hf_model, tmp_path, n_shards=n_shards)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == n_shards

    ours = load_llama(tmp_path, max_seq_len=256)
    assert _max_logit_diff(hf_model, ours, _tokens(hf_model.config.vocab_size)) <= TOL


def test_save_hf_round_trips_into_transformers(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    hf_model = tiny_hf_llama("gqa-llama3-rope")
    write_meta_checkpoint(hf_model, tmp_path / "meta")
    ours = load_llama(tmp_path / "meta", max_seq_len=256)
    save_hf(ours, tmp_path / "single")
    save_hf(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for name in ("single", "sharded"):
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
        assert _max_logit_diff(reloaded, ours, _tokens(hf_model.config.vocab_size)) <= TOL


def test_tied_model_saves_without_lm_head_and_reloads(tmp_path: Path) -> None:
    from safetensors import safe_open

    hf_model = tiny_hf_llama("tied-default-rope")
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_llama(tmp_path / "hf")
    assert ours.output.weight is ours.tok_embeddings.weight
    save_hf(ours, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    again = load_llama(tmp_path / "ours")
    assert again.output.weight is again.tok_embeddings.weight
    assert _max_logit_diff(hf_model, again, _tokens(hf_model.config.vocab_size)) <= TOL


def test_bfloat16_load_keeps_no_meta_tensors(tmp_path: Path) -> None:
    hf_model = tiny_hf_llama("gqa-llama3-rope")
    hf_model.save_pretrained(tmp_path)
    ours = load_llama(tmp_path, dtype="bfloat16")
    tensors = list(ours.parameters()) + list(ours.buffers())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    with torch.no_grad():
        expected = hf_model(_tokens(384)).logits
        got = ours(_tokens(384)).float()
    # bf16 keeps ~3 significant digits; the argmax must still agree almost everywhere.
    agree = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree >= 0.9
