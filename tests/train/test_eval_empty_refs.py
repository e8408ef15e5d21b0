"""Issue 11: a VQA record whose answer is empty (training skips it: no labelled token) is skipped by
`evaluate` as well, and counted, instead of being scored as a wrong answer."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mm_llama.train.eval_reader import CorruptSampleWarning
from mm_llama.data.records import EmptyReferenceError, read_caption, read_question_answer
from mm_llama.train.evaluation import evaluate, format_metrics
from tests.train.test_evaluation import _one_thread, _read_tar, _write_tar, model_and_tokenizer, synth_dir  # noqa: F401


def test_empty_references_are_an_empty_reference_error() -> None:
    for meta in ({"question": "what?", "answer": ""}, {"question": "what?", "answer": "  \t"},
                 {"question": "what?", "answers": ["", " "]}, {"question": "what?", "answers": [{"answer": ""}]}):
        with pytest.raises(EmptyReferenceError, match="reference answer is empty"):
            read_question_answer(None, meta)
    assert read_question_answer(None, {"question": "q", "answers": ["", "red"]}).references == ("red",)
    with pytest.raises(EmptyReferenceError, match="reference caption is empty"):
        read_caption("   ", {})


def test_evaluate_skips_and_counts_empty_answers(model_and_tokenizer, synth_dir: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    members = _read_tar(sorted((synth_dir / "image-qa").glob("*.tar"))[0])
    emptied = []
    fixed = []
    for name, data in members:
        if name.endswith(".json") and len(emptied) < 2:
            meta = json.loads(data)
            meta["answer"] = "" if not emptied else "   "
            emptied.append(name.rsplit(".", 1)[0])
            data = json.dumps(meta).encode()
        fixed.append((name, data))
    shard = _write_tar(tmp_path / "empty.tar", fixed)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", CorruptSampleWarning)
        result = evaluate(model, tok, shard, "vqa", batch_size=4, max_new_tokens=2, progress=False)
    total = len({n.rsplit(".", 1)[0] for n, _ in members})
    assert result.counts["samples"] == total - 2
    assert result.counts["skipped_samples"] == 2 and result.counts["empty_references"] == 2
    assert sorted(s["key"] for s in result.skipped) == sorted(emptied)
    assert all("reference answer is empty" in s["reason"] for s in result.skipped)
    assert not {r["key"] for r in result.records} & set(emptied)
    scores = [r["score"] for r in result.records]
    assert result.metrics["vqa_accuracy"] == pytest.approx(sum(scores) / len(scores))
    assert "2 with an empty reference" in format_metrics(result)
