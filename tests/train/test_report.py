"""The demo report's entry point: metrics.json for any subset of modalities, the page, the table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mm_llama.train.report import (
    ImageEvals, SpeechEvals, VideoEvals, format_table, metric_rows, write_report,
)
from tests.train.report_helpers import INJECTION, image_evals, loss_run, speech_evals, video_evals


@pytest.fixture(scope="module")
def evals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageEvals | VideoEvals | SpeechEvals]:
    root = tmp_path_factory.mktemp("evals")
    return {"image": image_evals(root, n=2), "video": video_evals(root, n=2), "speech": speech_evals(root, n=3)}


def test_all_three_modalities(tmp_path: Path, evals: dict) -> None:
    runs = {"lm": loss_run(tmp_path / "runs"), "video": loss_run(tmp_path / "runs", "video")}
    report = write_report(tmp_path, **evals, runs=runs, stage_seconds={"data": 1.0, "lm": 2.5},
                          settings={"modalities": ["image", "video", "speech"], "note": "<b>&"}, report_samples=2)
    assert list(report) == ["image", "video", "speech", "stage_seconds", "total_seconds", "files", "settings",
                            "loss_plots"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == report
    assert report["total_seconds"] == 3.5 and report["loss_plots"] == {"lm": "loss-lm.png", "video": "loss-video.png"}
    assert not any(Path(rel).is_absolute() for files in report["files"].values() for rel in files.values())
    assert all(Path(tmp_path, rel).resolve() == Path(getattr(evals[m], f)).resolve()
               for m, files in report["files"].items() for f, rel in files.items())
    assert report["speech"]["metrics"]["silence_words"] == 2 and report["video"]["motion"]["vqa_accuracy"] == 1.0
    page = (tmp_path / "report.html").read_text()
    assert re.findall(r"<h2>(\w+)", page) == ["Metrics", "Images", "Video", "Speech", "Training"]
    media = {"still": 2, "clip": 2, "strip": 2, "curve": 2}
    assert {cls: page.count(f'<img class="{cls}" src="data:image/') for cls in media} == media
    assert page.count('<audio controls preload="metadata"') == 2 and page.count("<img ") == sum(media.values())
    assert INJECTION not in page and "<b>&" not in page and "&lt;b&gt;&amp;" in page
    for label, value in metric_rows(report):
        assert f"<tr><td>{label}</td><td>{value}</td></tr>" in page  # labels and values hold no markup
    labels = [label for label, _ in metric_rows(report)]
    assert labels[0].startswith("VQA accuracy") and any(x.startswith("video QA") for x in labels)
    assert any(x.startswith("ASR word error rate") for x in labels) and labels[-1] == "wall time: total"


def test_any_subset_of_modalities(tmp_path: Path, evals: dict) -> None:
    report = write_report(tmp_path, speech=evals["speech"], runs={}, stage_seconds={}, settings={}, report_samples=1)
    assert list(report) == ["speech", "stage_seconds", "total_seconds", "files", "settings", "loss_plots"]
    page = (tmp_path / "report.html").read_text()
    assert re.findall(r"<h2>(\w+)", page) == ["Metrics", "Speech", "Training"]
    assert page.count("<audio ") == 1 and "<img " not in page and "(no training runs)" in page
    table = format_table(report).splitlines()
    assert len(table) == 2 + 3 + 1 and table[2].startswith("| ASR word error rate (3 test utterances)")
    video = write_report(tmp_path / "v", video=evals["video"], image=evals["image"], runs={}, stage_seconds={"a": 1},
                         settings={}, report_samples=0)
    assert list(video)[:2] == ["image", "video"] and "speech" not in video
    page = (tmp_path / "v" / "report.html").read_text()
    assert "<img " not in page and "0 clips shown" in page and "0 images shown" in page


def test_metric_rows_of_a_hand_made_report() -> None:
    report = {"video": {"metrics": {"vqa_accuracy": 0.5, "vqa_exact_match": 0.5, "majority_baseline": 0.25,
                                    "frozen_vqa_accuracy": 0.125},
                        "motion": {"types": [], "samples": 0, "vqa_accuracy": None, "frozen_vqa_accuracy": None,
                                   "majority_baseline": None},
                        "vqa_by_type": {}, "samples": {"questions": 8, "clips": 2}},
              "stage_seconds": {"video": 2.0}, "total_seconds": 2.0}
    assert metric_rows(report) == [
        ("video QA accuracy (8 test questions, 2 clips)", "50.0%"),
        ("video QA majority-answer baseline (per question type)", "25.0%"),
        ("video QA accuracy, frozen frame", "12.5%"),
        ("video QA accuracy, motion types (0)", "n/a (frozen n/a, majority n/a)"),
        ("wall time: video", "2.0 s"), ("wall time: total", "2.0 s")]


def test_bad_arguments_are_named(tmp_path: Path, evals: dict) -> None:
    common = {"runs": {}, "stage_seconds": {}, "settings": {}, "report_samples": 1}
    with pytest.raises(ValueError, match="at least one modality"):
        write_report(tmp_path, **common)
    with pytest.raises(TypeError, match=r"video= takes VideoEvals\(...\), got SpeechEvals"):
        write_report(tmp_path, video=evals["speech"], **common)
    with pytest.raises(ValueError, match="report_samples must be a non-negative integer, got -1"):
        write_report(tmp_path, speech=evals["speech"], **{**common, "report_samples": -1})
    swapped = SpeechEvals(asr=evals["video"].qa, asr_silence=evals["speech"].asr_silence)
    with pytest.raises(ValueError, match="asr: expected a asr evaluation result .* got task 'video_qa'"):
        write_report(tmp_path, speech=swapped, **common)
    assert not (tmp_path / "metrics.json").exists()
