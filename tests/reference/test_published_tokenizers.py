"""A tiny Llama 3.2 Vision built with transformers, saved with each tokenizer convention users bring
(`published_tokenizers.VARIANTS`): `vqa`, `caption`, `eval`, `load_image_model` and the training loader work,
and `mm-llama vqa` answers with Meta's greedy tokens.

The oracle is independent of mm_llama: the prompt is assembled by hand with the `tokenizers` library in
Meta's chat format, the pixels come from transformers' `MllamaImageProcessor`, and each greedy step is
transformers' forward with Meta's row mask restored (`hf_logits(meta_row_mask=True)`: the chat prompt has
text before the image, where transformers and Meta differ, issue 39379).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama.cli import main
from mm_llama.data.image_transform import CLIP_MEAN, CLIP_STD
from mm_llama.data.pipelines import LoaderConfig, image_text_loader
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.data.synth import write_synth
from mm_llama.image_chat import load_image_model
from mm_llama.tiny_checkpoint import sample_sentences
from mm_llama.tokenizer_training import train_llama3_tokenizer
from tests.reference.hf_mllama import MAX_TILES, TILE, Images, hf_logits, save_hf_mllama, tiny_hf_mllama
from tests.reference.published_tokenizers import VARIANTS, text_only_spec, text_vocab_size, write_tokenizer_variant

QUESTION = "What colour is the big circle on the left?"
MAX_NEW = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add spinning on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_llama3_tokenizer(sample_sentences(), 300, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def vocab(trained: Path) -> int:
    return text_vocab_size(text_only_spec(trained / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_model(vocab: int):
    return tiny_hf_mllama(vocab=vocab)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_mllama(hf_model, tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module", params=VARIANTS)
def model_dir(request, hf_dir: Path, trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    for name in ("config.json", "model.safetensors"):
        (out / name).symlink_to(hf_dir / name)
    return write_tokenizer_variant(trained, out, request.param)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 52, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def metas_answer(hf_model, trained: Path, vocab: int, image_file: Path) -> tuple[list[int], str]:
    """Meta's greedy tokens for the chat prompt (image, then QUESTION) and their text."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    hf_tok = HFTokenizer.from_file(str(trained / "tokenizer.json"))
    special, text = hf_tok.token_to_id, lambda s: hf_tok.encode(s, add_special_tokens=False).ids

    def header(role: str) -> list[int]:
        return [special("<|start_header_id|>"), *text(role), special("<|end_header_id|>"), *text("\n\n")]

    image_id = vocab  # Meta's <|image|>: the first id after the text vocabulary
    prompt = [special("<|begin_of_text|>"), *header("user"), image_id, *text(QUESTION), special("<|eot_id|>"),
              *header("assistant")]
    processor = MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES,
                                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    px = processor([[Image.open(image_file).convert("RGB")]], return_tensors="pt")
    images = Images(px["pixel_values"], px["aspect_ratio_ids"], px["aspect_ratio_mask"].bool(), px["num_tiles"])
    stops = {special("<|eot_id|>"), special("<|end_of_text|>"), special("<|eom_id|>")}
    tokens = list(prompt)
    for _ in range(MAX_NEW):
        logits = hf_logits(hf_model, torch.tensor([tokens]), images, meta_row_mask=True, image_token=image_id)
        nxt = int(logits[0, -1].argmax())
        if nxt in stops:
            break
        tokens.append(nxt)
    new = tokens[len(prompt):]
    return new, hf_tok.decode(new, skip_special_tokens=False)


def test_the_oracle_answer_is_long_enough_to_compare(metas_answer) -> None:
    new, answer = metas_answer
    assert len(new) >= 3 and len(set(new)) >= 2 and answer.strip(), metas_answer


def test_tokenizer_reads_the_image_token_of_each_convention(model_dir: Path, vocab: int) -> None:
    _, tok = load_image_model(model_dir, dtype=torch.float32, device="cpu")
    assert tok.vocab_size == vocab
    assert tok.image_id == (None if model_dir.name.startswith("llama-3.1-json") else vocab)


def test_vqa_answers_with_metas_greedy_tokens(model_dir: Path, image_file: Path, metas_answer, capsys) -> None:
    code = main(["vqa", "--model", str(model_dir), "--image", str(image_file), "--question", QUESTION,
                 "--max-new-tokens", str(MAX_NEW), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["answer"] == metas_answer[1].strip()


def test_library_generates_metas_greedy_token_ids(model_dir: Path, image_file: Path, metas_answer) -> None:
    from mm_llama.data.image_transform import ImageTransform, collate_images
    from mm_llama.generation import GenerationConfig, generate
    from mm_llama.image_chat import image_prompt

    model, tok = load_image_model(model_dir, dtype=torch.float32, device="cpu")
    images = collate_images([[ImageTransform(tile_size=TILE, max_tiles=MAX_TILES)(image_file)]], max_tiles=MAX_TILES)
    prompt = image_prompt(tok, QUESTION, model.image.token_id)
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=MAX_NEW, stop_ids=tok.stop_ids),
                   prefill_inputs={"images": images})
    assert out[0].tokens == metas_answer[0]


def test_caption_runs(model_dir: Path, image_file: Path, capsys) -> None:
    assert main(["caption", "--model", str(model_dir), str(image_file), "--max-new-tokens", "3", "--json"]) == 0
    assert "caption" in json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth("shapes", out, n=2, seed=1, split="test", samples_per_shard=4)
    return out


def test_eval_runs(model_dir: Path, synth_dir: Path, tmp_path: Path) -> None:
    from mm_llama.commands import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", str(model_dir), "--shards", str(synth_dir / "image-qa"),
                              "--task", "vqa", "--max-samples", "3", "--batch-size", "3", "--max-new-tokens", "2",
                              "--no-progress", "--out", str(tmp_path / "eval.json")])
    assert args.run(args) == 0
    assert json.loads((tmp_path / "eval.json").read_text())


def test_training_batches_put_the_models_image_id_in_every_prompt(model_dir: Path, synth_dir: Path,
                                                                  vocab: int) -> None:
    _, tok = load_image_model(model_dir, dtype=torch.float32, device="cpu")
    config = LoaderConfig(str(synth_dir / "image-qa"), batch_size=3, shuffle=False, tile_size=TILE,
                          max_tiles=MAX_TILES)
    batch = next(iter(image_text_loader(config, tok, task="vqa")))
    ids, labels = batch.text.input_ids, batch.text.labels
    assert ((ids == vocab).sum(dim=1) == 1).all()  # one <|image|> per prompt, at the model's image id
    assert (labels[ids == vocab] == IGNORE_INDEX).all()
    assert int(ids[labels == IGNORE_INDEX].max()) <= vocab and int(ids.max()) == vocab
