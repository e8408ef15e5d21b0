"""`glyphs` images: one character whose pixels lie in the named cell, answers that match the pixels,
disjoint splits, every layout through `write_synth` and the `synth` command."""

from __future__ import annotations

import argparse
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mm_llama.commands import synth
from mm_llama.data.synth import make_glyphs_sample, split_of, write_synth
from mm_llama.data.synth import shapes as shapes_module
from mm_llama.data.synth.glyphs import (
    COLOUR_PAIRS, GLYPHS, HEIGHT_FRACTION, IMAGE_SIZE, MIN_LUMA_DIFFERENCE, PALETTE, POSITION_CELLS,
    POSITION_PHRASES, POSITIONS, QUESTIONS, glyph_mask, luma,
)
from tests.data.synth.helpers import load_json, png_pixels, read_shards

CELL = IMAGE_SIZE / 3


def _cell_of(x: int) -> int:
    """Grid column (or row) holding pixel coordinate ``x``, computed from the pixel alone."""
    return int(x // CELL)


def _ink_box(pixels: np.ndarray, background: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (ends exclusive) of the pixels that differ from ``background``."""
    ys, xs = np.nonzero((pixels != np.array(background)).any(-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_same_arguments_give_identical_bytes() -> None:
    for i in range(5):
        a, b = make_glyphs_sample(7, "train", i), make_glyphs_sample(7, "train", i)
        assert a.records() == b.records()
    assert make_glyphs_sample(7, "train", 0).png != make_glyphs_sample(8, "train", 0).png
    assert make_glyphs_sample(7, "train", 0).png != make_glyphs_sample(7, "train", 1).png


def test_splits_are_disjoint_by_content() -> None:
    descriptions: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        descriptions[split] = set()
        for seed in (0, 1):
            for i in range(80):
                d = make_glyphs_sample(seed, split, i).content.description()
                assert split_of(d) == split, (split, i, d)
                descriptions[split].add(d)
    assert not descriptions["train"] & descriptions["val"]
    assert not descriptions["train"] & descriptions["test"]
    assert not descriptions["val"] & descriptions["test"]


def test_pixels_show_the_named_character_in_the_named_cell() -> None:
    for i in range(120):
        s = make_glyphs_sample(2, "train", i)
        meta = s.json_dict()
        pixels = png_pixels(s.png)
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        fg, bg = PALETTE[meta["colours"]["glyph"]], PALETTE[meta["colours"]["background"]]
        assert meta["rgb"] == {"glyph": list(fg), "background": list(bg)}
        assert abs(luma(fg) - luma(bg)) >= MIN_LUMA_DIFFERENCE
        # no antialiasing: every pixel is the glyph or the background colour
        is_fg, is_bg = (pixels == np.array(fg)).all(-1), (pixels == np.array(bg)).all(-1)
        assert (is_fg | is_bg).all() and is_fg.any() and is_bg.any(), i
        x0, y0, x1, y1 = _ink_box(pixels, bg)
        assert [x0, y0, x1, y1] == meta["bbox"], i
        # the whole ink box is in one cell, with background between it and every cell edge ...
        col, row = _cell_of(x0), _cell_of(y0)
        assert (_cell_of(x1 - 1), _cell_of(y1 - 1)) == (col, row), (i, meta["bbox"])
        assert (_cell_of(x0 - 1), _cell_of(y0 - 1)) == (col, row) and (_cell_of(x1), _cell_of(y1)) == (col, row)
        # ... its centre's cell is the answer
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert POSITION_CELLS[meta["position"]] == (_cell_of(cx), _cell_of(cy)) == (col, row), i
        w, h = x1 - x0, y1 - y0
        assert HEIGHT_FRACTION[0] * CELL <= h <= HEIGHT_FRACTION[1] * CELL and w <= HEIGHT_FRACTION[1] * CELL
        assert meta["size"]["width"] == w and meta["size"]["height"] == h
        # the ink is the named glyph's rendering at its size, and no other glyph's
        ink = is_fg[y0:y1, x0:x1]
        px = meta["size"]["font_px"]
        for g in GLYPHS:
            mask = np.asarray(glyph_mask(g, px)) > 0
            assert (mask.shape == ink.shape and (mask == ink).all()) == (g == meta["glyph"]), (i, g)


def test_every_glyph_and_position_occurs() -> None:
    samples = [make_glyphs_sample(0, "train", i) for i in range(400)]
    glyphs = Counter(s.content.glyph for s in samples)
    positions = Counter(s.content.position for s in samples)
    assert set(glyphs) == set(GLYPHS) and len(GLYPHS) == 20
    assert set(positions) == set(POSITIONS) and len(POSITIONS) == 9
    assert len({(s.content.colour, s.content.background) for s in samples}) > len(COLOUR_PAIRS) // 2
    heights = [s.bbox[3] - s.bbox[1] for s in samples]
    assert max(heights) - min(heights) >= 10  # sizes vary
    for word, cell in shapes_module.POSITION_CELLS.items():  # the words both kinds use mean the same cell
        assert POSITION_CELLS[word] == cell


def test_records_answer_what_the_questions_ask() -> None:
    for i in range(20):
        s = make_glyphs_sample(1, "val", i)
        records = s.records()
        [(key, cap)] = records["image-caption"]
        assert key == f"val-{i:08d}" and set(cap) == {"png", "txt", "json"}
        meta = load_json(cap["json"])
        phrase = POSITION_PHRASES[meta["position"]]
        assert cap["txt"].decode() == meta["caption"] == f"the character {meta['glyph']} {phrase}"
        assert (meta["kind"], meta["split"], meta["index"], meta["seed"]) == ("glyphs", "val", i, 1)
        assert (meta["width"], meta["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
        [(k0, q0), (k1, q1)] = records["image-qa"]
        assert (k0, k1) == (f"{key}-q0", f"{key}-q1")
        for files in (q0, q1):
            assert set(files) == {"png", "json"} and files["png"] == cap["png"]
        j0, j1 = load_json(q0["json"]), load_json(q1["json"])
        assert (j0["question"], j0["answer"], j0["type"]) == (QUESTIONS["identity"], meta["glyph"], "identity")
        assert (j1["question"], j1["answer"], j1["type"]) == (QUESTIONS["position"], meta["position"], "position")
        assert j0["image_key"] == j1["image_key"] == key and j0["split"] == "val"
        assert meta["qa"] == [{k: j[k] for k in ("question", "answer", "type")} for j in (j0, j1)]
        [(chat_key, chat)] = records["image-chat"]
        assert chat_key == key and set(chat) == {"png", "json"} and chat["png"] == cap["png"]
        assert load_json(chat["json"])["turns"] == meta["qa"]  # both questions, in order, in one record
        [(text_key, text)] = records["text"]
        assert text_key == key and set(text) == {"txt"}
        caption, *exchanges = text["txt"].decode().split("\n<|start_header_id|>")
        assert caption == meta["caption"]
        assert exchanges == [f"user<|end_header_id|>\n\n{j['question']}<|eot_id|><|start_header_id|>assistant"
                             f"<|end_header_id|>\n\n{j['answer']}<|eot_id|>" for j in (j0, j1)]
    assert make_glyphs_sample(0, "train", 0).caption.startswith("the character ")


def test_text_record_asks_what_the_adapter_is_asked(tmp_path: Path) -> None:
    """The LM reads each question exactly as the image stage's prompt asks it (less the ``<|image|>`` id),
    followed by the labelled answer: the same token ids, so the answer format it learns is the one it is used in."""
    from mm_llama.data.prompts import build_example
    from mm_llama.media_tokens import MediaTokens
    from mm_llama.tokenizer import Tokenizer
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    samples = [make_glyphs_sample(0, "train", i) for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer([s.caption for s in samples] * 4 + list(QUESTIONS.values()), 300, tmp_path / "tok")
    tok = Tokenizer.from_dir(tmp_path / "tok")
    media = MediaTokens(tok.vocab_size)
    for s in samples:
        document = tok.encode(s.text_document(), allow_special=True)
        for qa in s.qa:
            example = build_example(tok, media, "vqa", {"question": qa.question, "answer": qa.answer})
            exchange = [t for t in example.input_ids[1:] if t != media.image]  # no BOS, no image id
            starts = [i for i in range(len(document)) if document[i:i + len(exchange)] == exchange]
            assert len(starts) == 1, (s.key, qa)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    synth.add_parser(sub)
    return p


def test_write_synth_and_command(tmp_path: Path, capsys) -> None:
    write_synth("shapes", tmp_path, n=2, seed=0, split="train")  # glyphs shares shapes' folders ...
    summary = write_synth("glyphs", tmp_path, n=5, seed=0, split="train", samples_per_shard=4)
    assert summary.layouts["image-caption"].shards == ["glyphs-train-000000.tar", "glyphs-train-000001.tar"]
    assert summary.layouts["image-qa"].samples == 10
    assert summary.layouts["text"].shards == ["glyphs-train-000000.tar", "glyphs-train-000001.tar"]
    texts = read_shards(tmp_path / "text", "glyphs-train")
    assert [f["txt"].decode() for f in texts.values()] == [make_glyphs_sample(0, "train", i).text_document()
                                                          for i in range(5)]
    caption = read_shards(tmp_path / "image-caption", "glyphs-train")
    qa = read_shards(tmp_path / "image-qa", "glyphs-train")
    assert list(caption) == [f"train-{i:08d}" for i in range(5)]
    assert list(qa) == [f"train-{i:08d}-q{j}" for i in range(5) for j in (0, 1)]
    assert len(read_shards(tmp_path / "image-caption", "train")) == 2  # ... and leaves its shards alone
    assert all(load_json(f["json"])["kind"] == "shapes" for f in read_shards(tmp_path / "image-qa", "train").values())

    out = tmp_path / "cli"
    args = _parser().parse_args(["synth", "glyphs", str(out), "--n", "20", "--no-progress"])
    assert args.run(args) == 0
    assert "wrote 20 glyphs samples" in capsys.readouterr().out
    images = read_shards(out / "image-caption", "glyphs-train")
    assert len(images) == 20 and len(read_shards(out / "image-qa", "glyphs-train")) == 40
    assert {png_pixels(f["png"]).shape for f in images.values()} == {(IMAGE_SIZE, IMAGE_SIZE, 3)}
    args = _parser().parse_args(["synth", "glyphs", str(out), "--n", "1", "--square"])
    with pytest.raises(ValueError, match="--square applies to the shapes kind only"):
        args.run(args)


def test_loaders_read_every_image_layout(tmp_path: Path) -> None:
    pipelines = pytest.importorskip("mm_llama.data.pipelines")
    from mm_llama.data.prompts import IGNORE_INDEX
    from mm_llama.tokenizer import Tokenizer
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    write_synth("glyphs", tmp_path, n=4, seed=0, split="test")
    samples = [make_glyphs_sample(0, "test", i) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer([s.caption for s in samples] * 4 + list(QUESTIONS.values()), 300, tmp_path / "tok")
    tok = Tokenizer.from_dir(tmp_path / "tok")
    answers = [a for s in samples for a in (s.content.glyph, s.content.position)]
    expected = {"image-qa": answers, "caption": [s.caption for s in samples],
                "image-chat": ["".join(answers[i:i + 2]) for i in range(0, len(answers), 2)]}  # one sequence each
    for task, layout in (("vqa", "image-qa"), ("caption", "image-caption"), ("vqa", "image-chat")):
        config = pipelines.LoaderConfig(shards=str(tmp_path / layout / "glyphs-test-*.tar"), batch_size=8,
                                        tile_size=64, max_tiles=1, shuffle=False)
        loader = pipelines.loader_for_task(task, config, tok)
        [batch] = list(loader)
        want = expected["caption" if task == "caption" else layout]
        assert loader.stats.samples == len(want) and not loader.stats.skipped, (layout, loader.stats)
        labels, ids = batch.text.labels, batch.text.input_ids
        responses = [tok.decode(ids[b][labels[b] != IGNORE_INDEX].tolist(), skip_special=True)
                     for b in range(len(want))]
        assert responses == want, layout
