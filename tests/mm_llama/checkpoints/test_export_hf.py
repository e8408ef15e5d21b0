"""`mm-llama export --format hf`: a text LM that `AutoModelForCausalLM` / `AutoTokenizer` load as they are,
with logits equal to ours, the same token ids, our chat format and a generation config that stops where
ours does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from mm_llama.checkpoints import load_llama
from mm_llama.cli import main as cli
from mm_llama.tiny_checkpoint import write_tiny_checkpoint
from mm_llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lm"), seed=3)


def _export(source: Path, out: Path) -> Path:
    assert cli(["export", str(source), str(out), "--format", "hf", "--dtype", "float32"]) == 0
    return out


def test_round_trip_through_transformers(lm_dir: Path, tmp_path: Path) -> None:
    out = _export(lm_dir, tmp_path / "out")
    tok = Tokenizer.from_dir(lm_dir)
    tokens = torch.tensor([tok.encode("A red circle is on the left.", bos=True)])
    with torch.no_grad():
        ours = load_llama(lm_dir)(tokens)
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_tokenizer_chat_template_and_generation_config_are_written(lm_dir: Path, tmp_path: Path) -> None:
    out = _export(lm_dir, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    tok = Tokenizer.from_dir(lm_dir)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "A blue star is at the top. A green square?"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Where is the star? "}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) \
        == tok.encode_chat(messages)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.bos_token_id == tok.bos_id and sorted(gen.eos_token_id) == sorted(tok.stop_ids)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|end_of_text|>"


def test_a_meta_tiktoken_tokenizer_is_converted(lm_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "tiktoken-only"
    shutil.copytree(lm_dir, source)
    (source / "tokenizer.json").unlink()  # Meta's layout ships tokenizer.model only
    out = _export(source, tmp_path / "out")
    tok = Tokenizer.from_dir(source)
    assert tok.backend == "tiktoken"
    text = "A purple triangle is in the middle, 123 times!"
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_save_hf_without_a_tokenizer_still_writes_the_generation_config(lm_dir: Path, tmp_path: Path) -> None:
    from mm_llama.checkpoints import save_hf

    model = load_llama(lm_dir)
    save_hf(model, tmp_path / "bare")
    gen = json.loads((tmp_path / "bare" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == model.cfg.bos_token_id and gen["eos_token_id"] == model.cfg.eos_token_id
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


def test_a_text_lm_is_not_an_mllama(lm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["export", str(lm_dir), str(tmp_path / "o"), "--format", "hf-mllama"]) == 2
    assert "text-only LM; --format hf-mllama writes image models, use --format hf" in capsys.readouterr().err
