"""The demo report from hand-made evaluation results: escaping, images from shards, the metric rows."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mm_llama.train.evaluation import EvalResult, write_result
from mm_llama.train.report import format_table, loss_points, metric_rows, summarize, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture()
def evals(tmp_path: Path) -> dict[str, Path]:
    cap_shard = _shard(tmp_path / "cap.tar", {"img0.png": _png()})
    qa_shard = str(tmp_path / "qa.tar")  # never opened: the records carry the image's key
    vqa_records = [
        {"key": "img0-q0", "shard": qa_shard, "image_key": "img0", "question": "Is <b> & \"x\" red?",
         "type": "colour", "prediction": "<script>alert(1)</script>", "references": ["yes"], "score": 0.0,
         "exact_match": 0.0},
        {"key": "img0-q1", "shard": qa_shard, "image_key": "img0", "question": "How many?", "type": "count",
         "prediction": "2", "references": ["2"], "score": 1.0, "exact_match": 1.0},
    ]
    by_type = {"colour": {"samples": 1, "vqa_accuracy": 0.0, "majority_baseline": 1.0, "majority_answer": "yes"},
               "count": {"samples": 1, "vqa_accuracy": 1.0, "majority_baseline": 1.0, "majority_answer": "2"}}
    vqa = EvalResult("vqa", {"vqa_accuracy": 0.5, "exact_match": 0.5, "majority_baseline": 1.0}, {"samples": 2},
                     {"blank_images": False}, vqa_records, [], by_type)
    blank_vqa = EvalResult("vqa", {"vqa_accuracy": 0.0, "exact_match": 0.0, "majority_baseline": 1.0},
                           {"samples": 2}, {"blank_images": True},
                           [{**r, "prediction": "grey & co", "score": 0.0} for r in vqa_records], [],
                           {k: {**v, "vqa_accuracy": 0.0} for k, v in by_type.items()})
    cap_record = {"key": "img0", "shard": cap_shard, "prompt": "Describe.", "prediction": "A <red> square & more",
                  "references": ["A red square."], "cider": 1.5, "exact_match": 0.0}
    caption = EvalResult("caption", {"cider": 1.5, "exact_match": 0.0}, {"samples": 1}, {}, [cap_record])
    blank_caption = EvalResult("caption", {"cider": 0.25, "exact_match": 0.0}, {"samples": 1}, {},
                               [{**cap_record, "prediction": ""}])
    out = {}
    results = {"vqa": vqa, "vqa_blank": blank_vqa, "caption": caption, "caption_blank": blank_caption}
    for name, result in results.items():
        out[name] = write_result(result, tmp_path / f"{name}.json")
    return out


def test_report_escapes_text_and_embeds_the_shard_image(tmp_path: Path, evals: dict[str, Path]) -> None:
    run = tmp_path / "lm"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n{"step": 10, "eval": {"loss": 2.0}}\n'
                                       '{"step": 20, "loss": NaN}\n{"step": 30, "loss": 1.5}\n{"step": 4')
    (run / "config.yaml").write_text("name: tiny_lm_pretrain\n")
    report = write_report(tmp_path, **evals, runs={"lm": run}, stage_seconds={"data": 1.0, "lm": 2.5},
                          settings={"train_images": 3}, report_images=5)
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Is &lt;b&gt; &amp; &quot;x&quot; red?" in page and "A &lt;red&gt; square &amp; more" in page
    assert "grey &amp; co" in page and "(empty)" in page  # blank-image answers; an empty caption says so
    assert page.count('<img src="data:image/png;base64,') == 2  # the test image and one loss curve
    assert (tmp_path / "loss-lm.png").read_bytes()[:8] == PNG
    assert loss_points(run / "metrics.jsonl") == [(10, 3.0), (30, 1.5)]
    assert report["metrics"]["blank_caption_cider"] == 0.25 and report["total_seconds"] == 3.5
    assert report["vqa_by_type"]["colour"]["blank_vqa_accuracy"] == 0.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == report
    assert report["files"]["vqa"] == "vqa.json"


def test_metric_rows_and_table(evals: dict[str, Path]) -> None:
    results = {k: json.loads(p.read_text()) for k, p in evals.items()}
    report = {**summarize(**results), "stage_seconds": {"lm": 2.0}, "total_seconds": 2.0}
    rows = dict(metric_rows(report))
    assert rows["VQA accuracy (2 test questions)"] == "50.0%"
    assert rows["majority-answer baseline (per question type)"] == "100.0%"
    assert rows["VQA accuracy, blank images"] == "0.0%"
    assert rows["caption CIDEr (1 test images)"] == "1.500" and rows["caption CIDEr, blank images"] == "0.250"
    assert rows["VQA accuracy, type colour (1)"] == "0.0% (blank 0.0%, majority 100.0%)"
    assert rows["wall time: lm"] == "2.0 s"
    table = format_table(report).splitlines()
    assert table[0].startswith("| metric") and len(table) == len(rows) + 2
    with pytest.raises(ValueError, match="expected a vqa evaluation result"):
        summarize(results["caption"], results["vqa_blank"], results["caption"], results["caption_blank"])
