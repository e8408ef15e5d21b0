"""`shapes` images: described colours sit at the described positions, shapes do not overlap; ``square``
changes only the image size."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mm_llama.commands import synth
from mm_llama.data.synth import grammar
from mm_llama.data.synth.shapes import IMAGE_SIZES, POSITION_CELLS, SQUARE_SIZE, make_shapes_sample
from tests.data.synth.helpers import load_json, png_pixels, read_shards


def _position_of(cx: int, cy: int, width: int, height: int) -> str | None:
    cell = (int(cx // (width / 3)), int(cy // (height / 3)))
    return next((p for p, c in POSITION_CELLS.items() if c == cell), None)


@pytest.mark.parametrize("square", [False, True])
def test_pixels_match_the_description(square: bool) -> None:
    sizes = set()
    for i in range(40):
        s = make_shapes_sample(3, "train", i, square=square)
        pixels = png_pixels(s.png)
        assert pixels.shape == (s.height, s.width, 3)
        sizes.add((s.width, s.height))
        meta = s.json_dict()
        assert len(meta["objects"]) == len(s.scene.objects)
        bg = np.array(grammar.BACKGROUNDS[s.background])
        assert (pixels[0, 0] == bg).all()  # corners are background: shapes stay inside their cells
        for obj in meta["objects"]:
            cx, cy = obj["center"]
            # the described colour is at the shape's centre, and the centre lies in the described position
            assert tuple(pixels[cy, cx]) == grammar.COLOURS[obj["colour"]], (i, obj)
            assert _position_of(cx, cy, s.width, s.height) == obj["position"], (i, obj)
            # the caption names every object with its position
            assert obj["colour"] in s.caption and obj["shape"] in s.caption
            assert grammar.POSITION_PHRASES[obj["position"]] in s.caption.lower()
        # no overlaps: bounding circles are disjoint
        for a in range(len(meta["objects"])):
            for b in range(a + 1, len(meta["objects"])):
                oa, ob = meta["objects"][a], meta["objects"][b]
                dist = math.dist(oa["center"], ob["center"])
                assert dist > oa["radius"] + ob["radius"], (i, oa, ob)
    assert sizes == {SQUARE_SIZE} if square else (len(sizes) >= 3 and sizes <= set(IMAGE_SIZES))


def test_square_changes_only_the_image_size() -> None:
    for i in range(30):
        plain, square = make_shapes_sample(5, "train", i), make_shapes_sample(5, "train", i, square=True)
        assert (square.width, square.height) == SQUARE_SIZE
        assert (square.scene, square.background, square.caption) == (plain.scene, plain.background, plain.caption)
        assert (square.qa, square.selected_qa) == (plain.qa, plain.selected_qa)
        assert square.json_dict()["square"] is True and "square" not in plain.json_dict()
    with pytest.raises(ValueError, match="square must be True or False, got 'yes'"):
        make_shapes_sample(5, "train", 0, square="yes")  # type: ignore[arg-type]


def test_command_square_flag(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    synth.add_parser(sub)
    args = p.parse_args(["synth", "shapes", str(tmp_path), "--n", "6", "--square", "--no-progress"])
    assert args.run(args) == 0
    assert json.loads((tmp_path / "synth-shapes-train.json").read_text())["options"] == {"square": True}
    for layout in ("image-caption", "image-qa"):
        images = [png_pixels(files["png"]) for files in read_shards(tmp_path / layout, "train").values()]
        assert images and {im.shape for im in images} == {(SQUARE_SIZE[1], SQUARE_SIZE[0], 3)}
    args = p.parse_args(["synth", "text", str(tmp_path), "--n", "1", "--square"])
    with pytest.raises(ValueError, match="--square applies to the shapes kind only"):
        args.run(args)


def test_large_shapes_cover_more_pixels_than_small_ones() -> None:
    areas: dict[str, list[int]] = {"small": [], "large": []}
    for i in range(40):
        s = make_shapes_sample(4, "val", i)
        if len(s.placed) != 1:
            continue
        pixels = png_pixels(s.png).astype(int)
        colour = np.array(grammar.COLOURS[s.placed[0].obj.colour])
        cell = min(s.width, s.height) / 3
        areas[s.placed[0].obj.size].append(int((np.abs(pixels - colour).sum(-1) == 0).sum()) / cell**2)
    assert areas["small"] and areas["large"]
    assert max(areas["small"]) < min(areas["large"])


def test_records_have_every_layout() -> None:
    s = make_shapes_sample(0, "test", 2)
    records = s.records()
    [(key, cap)] = records["image-caption"]
    assert key == "test-00000002" and set(cap) == {"png", "txt", "json"}
    meta = load_json(cap["json"])
    assert meta["caption"] == cap["txt"].decode() and meta["split"] == "test" and meta["qa"]
    qa = records["image-qa"]
    assert len(qa) >= 4
    types = []
    for j, (qkey, files) in enumerate(qa):
        assert qkey == f"{key}-q{j}" and set(files) == {"png", "json"} and files["png"] == cap["png"]
        q = load_json(files["json"])
        assert q["question"].endswith("?") and q["answer"] and " " not in q["answer"] and q["image_key"] == key
        assert {"question": q["question"], "answer": q["answer"], "type": q["type"]} in meta["qa"]
        types.append(q["type"])
    assert len(set(types)) == len(types)
    [(chat_key, chat)] = records["image-chat"]
    assert chat_key == key and chat["png"] == cap["png"]
    turns = load_json(chat["json"])["turns"]
    asked = [load_json(files["json"]) for _, files in qa]
    assert sorted(t["question"] for t in turns[:-1]) == sorted(q["question"] for q in asked)  # every question once
    assert turns[-1] == {"question": "Describe this image in one sentence.", "answer": meta["caption"], "type": "caption"}


def test_chat_question_order_is_shuffled_per_image_and_reproducible() -> None:
    orders = []
    for i in range(12):
        turns = load_json(make_shapes_sample(0, "train", i).chat_record()[1]["json"])["turns"]
        assert turns == load_json(make_shapes_sample(0, "train", i).chat_record()[1]["json"])["turns"]
        orders.append(tuple(t["type"] for t in turns[:-1]))
    assert len(set(orders)) > 6  # not one fixed order of question types
