"""`objects` images: one shape of the described size and shape at the described position, in a colour the
caption never names; disjoint splits; shards beside shapes' through `write_synth` and the `synth` command,
read by the contrastive loader."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from mm_llama.commands import synth
from mm_llama.data.synth import grammar, split_of, write_synth
from mm_llama.data.synth.objects import make_object_sample
from mm_llama.data.synth.shapes import POSITION_CELLS, SQUARE_SIZE
from tests.data.synth.helpers import load_json, png_pixels, read_shards


def _position_of(cx: int, cy: int) -> str | None:
    width, height = SQUARE_SIZE
    cell = (int(cx // (width / 3)), int(cy // (height / 3)))
    return next((p for p, c in POSITION_CELLS.items() if c == cell), None)


def test_same_arguments_give_identical_bytes() -> None:
    for i in range(5):
        assert make_object_sample(3, "train", i).records() == make_object_sample(3, "train", i).records()
    assert make_object_sample(3, "train", 0).png != make_object_sample(4, "train", 0).png


def test_splits_are_disjoint_by_content() -> None:
    seen: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        seen[split] = set()
        for i in range(60):
            description = grammar.Scene((make_object_sample(0, split, i).placed.obj,)).description()
            assert split_of(description) == split
            seen[split].add(description)
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


def test_pixels_show_one_object_where_the_caption_says_without_naming_its_colour() -> None:
    areas: dict[str, list[int]] = {"small": [], "large": []}
    for i in range(60):
        s = make_object_sample(1, "train", i)
        pixels = png_pixels(s.png)
        assert pixels.shape == (SQUARE_SIZE[1], SQUARE_SIZE[0], 3)
        obj, (cx, cy) = s.placed.obj, (s.placed.cx, s.placed.cy)
        rgb, background = grammar.COLOURS[obj.colour], grammar.BACKGROUNDS[s.background]
        assert tuple(pixels[cy, cx]) == rgb and _position_of(cx, cy) == obj.position
        colours = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert colours == {rgb, background}, i  # one object, no antialiasing
        ys, xs = np.nonzero((pixels == np.array(rgb)).all(-1))
        assert {_position_of(int(x), int(y)) for x, y in zip(xs, ys)} == {obj.position}  # inside its cell
        areas[obj.size].append(len(xs))
        words = s.caption.lower().rstrip(".").split()
        assert s.caption == f"{grammar.indefinite(obj.size)} {obj.size} {obj.shape} " \
                            f"{grammar.POSITION_PHRASES[obj.position]}.".capitalize()
        assert not set(words) & set(grammar.COLOURS), s.caption
    assert min(areas["large"]) > max(areas["small"])


def test_every_shape_size_and_position_occurs() -> None:
    objs = [make_object_sample(0, "train", i).placed.obj for i in range(300)]
    for attribute, values in (("shape", grammar.SHAPES), ("size", grammar.SIZES), ("position", grammar.POSITIONS),
                              ("colour", tuple(grammar.COLOURS))):
        counts = Counter(getattr(o, attribute) for o in objs)
        assert set(counts) == set(values), attribute


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    synth.add_parser(p.add_subparsers(dest="command"))
    return p


def test_write_synth_beside_shapes_and_command(tmp_path: Path, capsys) -> None:
    write_synth("shapes", tmp_path, n=2, seed=0, split="train")
    summary = write_synth("objects", tmp_path, n=5, seed=0, split="train", samples_per_shard=4)
    assert list(summary.layouts) == ["image-caption"]
    assert summary.layouts["image-caption"].shards == ["objects-train-000000.tar", "objects-train-000001.tar"]
    written = read_shards(tmp_path / "image-caption", "objects-train")
    for i, (key, files) in enumerate(written.items()):
        sample = make_object_sample(0, "train", i)
        assert key == sample.key and files["txt"].decode() == sample.caption
        info = load_json(files["json"])
        assert info["kind"] == "objects" and info["objects"][0]["shape"] == sample.placed.obj.shape
    assert len(read_shards(tmp_path / "image-caption", "train")) == 2  # shapes' shards untouched

    out = tmp_path / "cli"
    args = _parser().parse_args(["synth", "objects", str(out), "--n", "12", "--no-progress"])
    assert args.run(args) == 0
    assert "wrote 12 objects samples" in capsys.readouterr().out
    assert len(read_shards(out / "image-caption", "objects-train")) == 12


def test_caption_loader_reads_the_captions(tmp_path: Path) -> None:
    import warnings

    from mm_llama.data import pipelines
    from mm_llama.data.prompts import IGNORE_INDEX
    from mm_llama.tokenizer import Tokenizer
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    write_synth("objects", tmp_path, n=6, seed=0, split="test")
    captions = [make_object_sample(0, "test", i).caption for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer(captions * 4, 300, tmp_path / "tok")
    tok = Tokenizer.from_dir(tmp_path / "tok")
    config = pipelines.LoaderConfig(shards=str(tmp_path / "image-caption" / "objects-test-*.tar"), batch_size=8,
                                    tile_size=64, max_tiles=1, shuffle=False)
    loader = pipelines.loader_for_task("caption", config, tok)  # what the contrastive stage reads
    [batch] = list(loader)
    ids, labels = batch.text.input_ids, batch.text.labels
    read = [tok.decode(ids[b][labels[b] != IGNORE_INDEX].tolist(), skip_special=True) for b in range(len(captions))]
    assert read == captions and tuple(batch.images.pixels.shape[:3]) == (6, 1, 1)
