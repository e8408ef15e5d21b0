"""`question_types`: a loader keeps only the records of the named question types (a curriculum stage on one
kind of question), counts the rest apart from skips, and says so when no record matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_llama.data.loader_stats import QuestionTypesError
from mm_llama.data.pipelines import image_text_loader, loader_for_task, video_text_loader
from tests.data.test_pipelines import (
    collect, config, image_bytes, keys_of, labelled_text, tokenizer, video_sample, write_shards,
)

ANSWERS = {"shape": "circle", "colour": "red", "count": "two"}


def typed_sample(i: int, qtype: str | None) -> dict[str, bytes]:
    meta = {"question": f"question {i}?", "answer": ANSWERS.get(qtype or "", "blue")}
    if qtype is not None:
        meta["type"] = qtype
    return {"png": image_bytes("PNG", 32, 32, i), "json": json.dumps(meta).encode()}


def test_only_the_named_types_are_kept_and_the_rest_counted(tmp_path: Path) -> None:
    kinds = ["shape", "colour", "count", None, "shape", "colour", "shape"]
    shards = write_shards(tmp_path, [typed_sample(i, t) for i, t in enumerate(kinds)])
    loader = image_text_loader(config(shards, batch_size=8), tokenizer(), task="vqa", question_types=["shape"])
    batches, sources = collect(loader)
    assert sorted(keys_of(sources)) == [f"{i:09d}" for i, t in enumerate(kinds) if t == "shape"]
    tok, text = tokenizer(), batches[0].text
    assert [labelled_text(tok, text.input_ids[b], text.labels[b]) for b in range(3)] == ["circle"] * 3
    assert loader.stats.samples == 3 and loader.stats.skipped_total == 0
    assert loader.stats.left_out == {"colour": 2, "count": 1, "<none>": 1}
    assert "4 of other question types left out" in loader.stats.summary()


def test_several_types_and_the_registry_route(tmp_path: Path) -> None:
    kinds = ["shape", "colour", "count", "colour"]
    shards = write_shards(tmp_path, [typed_sample(i, t) for i, t in enumerate(kinds)])
    loader = loader_for_task("vqa", config(shards, batch_size=8), tokenizer(), question_types=("colour", "count"))
    assert sorted(keys_of(collect(loader)[1])) == ["000000001", "000000002", "000000003"]


def test_no_matching_record_is_a_clear_error(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, [typed_sample(i, "colour") for i in range(4)])
    loader = image_text_loader(config(shards), tokenizer(), task="vqa", question_types=["shpae"])
    with pytest.raises(QuestionTypesError, match=r"\['shpae'\] matched none of the 4 records.*colour \(4\)"):
        collect(loader)


def test_an_endless_stream_without_a_match_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mm_llama.data import loader_stats

    monkeypatch.setattr(loader_stats, "TYPES_MET_LIMIT", 12)
    shards = write_shards(tmp_path, [typed_sample(i, "colour") for i in range(4)])
    loader = image_text_loader(config(shards, resampled=True), tokenizer(), task="vqa", question_types=["shape"])
    with pytest.raises(QuestionTypesError, match="matched none of the 12 records"):
        collect(loader)


def test_video_records_filter_the_same_way(tmp_path: Path) -> None:
    samples = []
    for i, qtype in enumerate(["direction", "count", "direction"]):
        sample = video_sample(i)
        sample["json"] = json.dumps({"question": "where does it go?", "answer": "up", "type": qtype}).encode()
        samples.append(sample)
    shards = write_shards(tmp_path, samples)
    loader = video_text_loader(config(shards), tokenizer(), task="video_qa", num_frames=2,
                               question_types=["direction"])
    assert sorted(keys_of(collect(loader)[1])) == ["000000000", "000000002"]
    assert loader.stats.left_out == {"count": 1}


@pytest.mark.parametrize("bad", ["shape", [], [""], [3]])
def test_bad_question_types_are_refused(tmp_path: Path, bad: object) -> None:
    shards = write_shards(tmp_path, [typed_sample(0, "shape")])
    with pytest.raises(ValueError, match="question_types must be"):
        image_text_loader(config(shards), tokenizer(), task="vqa", question_types=bad)  # type: ignore[arg-type]
