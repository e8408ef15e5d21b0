"""`mm-llama caption` / `vqa` end to end on a tiny Llama 3.2 Vision checkpoint saved by the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm_llama.checkpoints.multimodal_loading import load_multimodal
from mm_llama.cli import main
from mm_llama.generation import GenerationConfig, generate
from mm_llama.image_chat import image_prompt
from mm_llama.tiny_checkpoint import sample_sentences
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mllama")
    train_llama3_tokenizer(sample_sentences(), 300, path)
    vocab = Tokenizer.from_dir(path).vocab_size
    save_hf_mllama(tiny_hf_mllama(vocab=vocab), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 30), (90, 20), (12, 64)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_caption_matches_the_library_and_prints_json(model_dir: Path, images: list[Path], capsys) -> None:
    assert main(["caption", "--model", str(model_dir), *map(str, images), "--max-new-tokens", "5", "--json",
                 "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(isinstance(r["caption"], str) for r in rows)

    # independent expectation: the same prompt through the library, one image at a time
    from mm_llama.data.image_transform import ImageTransform, collate_images

    model, tok = load_multimodal(model_dir), Tokenizer.from_dir(model_dir)
    transform = ImageTransform(tile_size=28, max_tiles=4)
    for path, row in zip(images, rows):
        batch = collate_images([[transform(path)]], max_tiles=4)
        prompt = image_prompt(tok, "Describe this image in one sentence.", model.image.token_id)
        out = generate(model, [prompt], GenerationConfig(max_new_tokens=5, stop_ids=tok.stop_ids,
                                                         pad_id=tok.pad_id), prefill_inputs={"images": batch})
        assert row["caption"] == tok.decode(out[0].tokens).strip()


def test_caption_skips_unreadable_files_names_them_and_exits_nonzero(model_dir: Path, images: list[Path], capsys) -> None:
    bad = images[0].parent / "notes.txt"
    code = main(["caption", "--model", str(model_dir), str(images[0]), str(bad), str(images[1]), "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "notes.txt" in err and "1 of 3 image(s) could not be read" in err
    assert f"{images[0]}:" in out and f"{images[1]}:" in out


def test_vqa_answers_and_reports_the_question(model_dir: Path, images: list[Path], capsys) -> None:
    assert main(["vqa", "--model", str(model_dir), "--image", str(images[2]), "--question", "What colour is it?",
                 "--max-new-tokens", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["question"] == "What colour is it?" and isinstance(row["answer"], str)


def test_vqa_on_a_missing_image_fails_cleanly(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["vqa", "--model", str(model_dir), "--image", str(tmp_path / "nope.jpg"), "--question", "?"]) == 1
    assert "nope.jpg" in capsys.readouterr().err


def test_text_only_checkpoint_is_refused_with_a_pointer_to_generate(tmp_path: Path, images, capsys) -> None:
    from mm_llama.tiny_checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "lm")
    assert main(["caption", "--model", str(tmp_path / "lm"), str(images[0])]) == 2
    assert "mm-llama generate" in capsys.readouterr().err


def test_model_without_tokenizer_is_a_clear_error(model_dir: Path, tmp_path: Path, images, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    for name in ("tokenizer.json", "tokenizer.model"):
        (copy / name).unlink()
    assert main(["caption", "--model", str(copy), str(images[0])]) == 2
    assert "no tokenizer.model or tokenizer.json" in capsys.readouterr().err
