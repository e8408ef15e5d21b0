"""The video section of the demo report: the motion aggregate, the frozen-frame control, animated clips."""

from __future__ import annotations

import base64
import html
import io
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mm_llama.data.decoders import DecodeError
from mm_llama.data.synth.grammar import CLIP_QA_TYPES
from mm_llama.data.synth.moving_shapes import FRAMES, HEIGHT, WIDTH
from mm_llama.train.eval_result import EvalResult
from mm_llama.train.report_video import (
    MOTION_TYPES, STRIP_FRAMES, VIDEO, clip_media, metric_rows, section_html, summarize,
)
from tests.train.report_helpers import INJECTION, shard_samples, video_evals


def _record(key: str, qtype: str, answer: str, score: float) -> dict[str, Any]:
    return {"key": key, "shard": "unused.tar", "video_key": key.split("-")[0], "question": f"{qtype}?",
            "type": qtype, "prediction": answer if score else "x", "references": [answer], "score": score,
            "exact_match": score}


def test_motion_aggregate_from_hand_made_records() -> None:
    # (key, type, reference, score on the clip, score on the frozen frame)
    rows = [("c0-q0", "direction", "left", 1.0, 0.0), ("c0-q1", "count", "2", 1.0, 1.0),
            ("c0-q2", "moves", "yes", 0.0, 0.0), ("c1-q0", "turn", "red", 0.0, 0.0),
            ("c1-q1", "start_colour", "blue", 1.0, 1.0), ("c1-q2", "moves", "no", 1.0, 1.0)]
    by_type = {"direction": {"samples": 1, "vqa_accuracy": 1.0, "majority_baseline": 1.0, "majority_answer": "left"},
               "count": {"samples": 1, "vqa_accuracy": 1.0, "majority_baseline": 1.0, "majority_answer": "2"},
               "moves": {"samples": 2, "vqa_accuracy": 0.5, "majority_baseline": 0.5, "majority_answer": "no"},
               "turn": {"samples": 1, "vqa_accuracy": 0.0, "majority_baseline": 1.0, "majority_answer": "red"},
               "start_colour": {"samples": 1, "vqa_accuracy": 1.0, "majority_baseline": 1.0,
                                "majority_answer": "blue"}}
    frozen_types = {**by_type, "direction": {**by_type["direction"], "vqa_accuracy": 0.0}}
    qa = EvalResult("video_qa", {"vqa_accuracy": 4 / 6, "exact_match": 4 / 6, "majority_baseline": 5 / 6},
                    {"samples": 6}, {}, [_record(k, t, a, s) for k, t, a, s, _ in rows], [], by_type)
    frozen = EvalResult("video_qa", {"vqa_accuracy": 3 / 6, "exact_match": 3 / 6, "majority_baseline": 5 / 6},
                        {"samples": 6}, {"blank_video": True}, [_record(k, t, a, f) for k, t, a, _, f in rows], [],
                        frozen_types)
    part = summarize({"qa": qa.to_dict(), "qa_frozen": frozen.to_dict()})
    assert part["metrics"] == {"vqa_accuracy": 4 / 6, "vqa_exact_match": 4 / 6, "majority_baseline": 5 / 6,
                               "frozen_vqa_accuracy": 0.5}
    # motion: direction (1, frozen 0), moves (0 and 1, frozen 0 and 1), turn (0, frozen 0)
    assert part["motion"] == {"types": ["direction", "moves", "turn"], "samples": 4, "vqa_accuracy": 0.5,
                              "frozen_vqa_accuracy": 0.25, "majority_baseline": (1.0 + 2 * 0.5 + 1.0) / 4}
    assert part["samples"] == {"questions": 6, "clips": 2}
    assert part["vqa_by_type"]["direction"]["frozen_vqa_accuracy"] == 0.0
    assert [t for t, s in part["vqa_by_type"].items() if s["motion"]] == ["direction", "moves", "turn"]
    rows_ = dict(metric_rows(part))
    assert rows_["video QA accuracy (6 test questions, 2 clips)"] == "66.7%"
    assert rows_["video QA accuracy, frozen frame"] == "50.0%"
    assert rows_["video QA accuracy, motion types (4)"] == "50.0% (frozen 25.0%, majority 75.0%)"
    assert rows_["video QA accuracy, type moves (motion) (2)"] == "50.0% (frozen 50.0%, majority 50.0%)"
    assert rows_["video QA accuracy, type count (1)"] == "100.0% (frozen 100.0%, majority 100.0%)"


def test_motion_types_split_the_generators_question_types() -> None:
    # the frozen-frame control shows the first frame: it answers how many shapes there are and a turning
    # shape's first colour; everything else needs the later frames
    assert MOTION_TYPES <= set(CLIP_QA_TYPES)
    assert set(CLIP_QA_TYPES) - MOTION_TYPES == {"count", "start_colour"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return VIDEO.read(video_evals(tmp_path_factory.mktemp("video"), n=2))


def test_clip_media_is_an_animated_gif_and_a_frame_strip(results: dict[str, dict[str, Any]]) -> None:
    record = results["qa"]["records"][0]
    mp4 = dict(shard_samples(Path(record["shard"])))[record["key"]]["mp4"]
    gif, strip = clip_media(mp4, "clip.mp4")
    animated = Image.open(io.BytesIO(gif))
    assert animated.format == "GIF" and animated.size == (WIDTH, HEIGHT) and 1 < animated.n_frames <= FRAMES
    assert Image.open(io.BytesIO(strip)).size == (STRIP_FRAMES * WIDTH + (STRIP_FRAMES - 1) * 2, HEIGHT)
    with pytest.raises(DecodeError):
        clip_media(b"not a video", "bad.mp4")


def test_section_shows_each_clip_beside_its_answers_and_frozen_answers(results: dict[str, dict[str, Any]]) -> None:
    part = summarize(results)
    page = section_html(results, part, limit=5)
    records = results["qa"]["records"]
    clips = list(dict.fromkeys(r["video_key"] for r in records))
    assert len(clips) == 2 and "2 clips shown" in page
    gifs = re.findall(r'<img class="clip" src="data:image/gif;base64,([^"]+)" alt="([^"]+) \(animated\)"', page)
    assert [alt for _, alt in gifs] == clips
    assert all(Image.open(io.BytesIO(base64.b64decode(b))).n_frames > 1 for b, _ in gifs)
    assert page.count('<img class="strip" src="data:image/png;base64,') == 2
    assert all(f"<td>{html.escape(r['question'])}</td>" in page for r in records)
    assert INJECTION not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the count answers
    assert page.count("<td class=\"muted\">still &amp; &lt;b&gt;</td>") == sum(
        r["type"] not in ("count", "start_colour") for r in records)
    assert page.count("(motion)</span>") == sum(r["type"] in MOTION_TYPES for r in records)
    assert page.count('<span class="bad">') == sum(r["type"] == "count" for r in records)
    one = section_html(results, part, limit=1)
    assert one.count("<tr><td>") == sum(r["video_key"] == clips[0] for r in records) and "1 clips shown" in one


def test_missing_or_broken_clips_are_named_not_fatal(tmp_path: Path, results: dict[str, dict[str, Any]]) -> None:
    moved = {**results, "qa": {**results["qa"], "records": [{**r, "shard": str(tmp_path / "gone.tar")}
                                                             for r in results["qa"]["records"]]}}
    assert section_html(moved, summarize(results), limit=1).count("(clip not found)") == 1
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        first = results["qa"]["records"][0]
        info = tarfile.TarInfo(f"{first['key']}.mp4")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\0\0\0\0"))
    damaged = {**results, "qa": {**results["qa"], "records": [{**first, "shard": str(broken)}]}}
    assert "(clip not decoded: " in section_html(damaged, summarize(results), limit=1)
