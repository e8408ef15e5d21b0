"""The video part of the demo report: video QA beside its frozen-frame control, with the clips animated.

The frozen-frame control (`evaluate_video(blank_video=True)`) replaces every frame of a clip by its first:
the content stays, the motion goes. Questions whose answer needs more than that one frame are the
`MOTION_TYPES`; on them a model that uses the clip should beat its frozen-frame score.

metrics.json's ``video`` part (`summarize`)::

    {"metrics": {"vqa_accuracy", "vqa_exact_match", "majority_baseline", "frozen_vqa_accuracy"},
     "motion": {"types": [present motion types], "samples", "vqa_accuracy", "frozen_vqa_accuracy",
                "majority_baseline"},
     "vqa_by_type": {TYPE: {"samples", "vqa_accuracy", "frozen_vqa_accuracy", "majority_baseline",
                            "majority_answer", "motion"}},
     "samples": {"questions": video QA records, "clips": distinct clips}}

Fractions in [0, 1]; the motion accuracies are None when no motion question was evaluated. The HTML
section shows the first clips of the video QA records: each clip is read back from its record's shard
(``KEY.mp4``, as ``moving-shapes`` writes the video-qa layout), decoded with `mm_llama.data.decoders`,
and shown as an animated GIF and a strip of `STRIP_FRAMES` frames, beside its questions with the
model's answer, the reference, a mark and the frozen-frame answer.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_llama.train.report_common import Modality, Results, by_type_with_control, pct, shard_members
from mm_llama.train.report_html import data_uri, esc, question_table, text

__all__ = ["MOTION_TYPES", "STRIP_FRAMES", "VIDEO", "VideoEvals", "clip_media", "metric_rows", "section_html",
           "summarize"]

MOTION_TYPES: frozenset[str] = frozenset({"direction", "moves", "mover", "turn", "changer", "end_colour"})
"""Question types of ``moving-shapes`` (`grammar.clip_qa`) that the first frame cannot answer: which way a
shape moves (``direction``), whether it moves (``moves``), which shape moves (``mover``), which shape
changes colour (``changer``), and the colour it turns (``turn``, ``end_colour``: a turning shape changes
colour at frame 6-9 of 16). The other two, ``count`` and ``start_colour``, are answered by the first frame
alone, which is what the frozen-frame control shows."""
STRIP_FRAMES = 4
"""Frames, spread uniformly from the first to the last, in a clip's frame strip."""


@dataclass(frozen=True)
class VideoEvals:
    """`write_result` files of the video evaluations: ``video_qa`` on the clips (``qa``) and the same with
    every frame replaced by the clip's first (``qa_frozen``, ``blank_video=True``)."""

    qa: Path
    qa_frozen: Path


TASKS = {"qa": "video_qa", "qa_frozen": "video_qa"}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: Results) -> dict[str, Any]:
    """The ``video`` part of metrics.json (see the module docstring) from the qa and frozen-frame results."""
    qa, frozen = results["qa"], results["qa_frozen"]
    metrics = {
        "vqa_accuracy": qa["metrics"]["vqa_accuracy"],
        "vqa_exact_match": qa["metrics"]["exact_match"],
        "majority_baseline": qa["metrics"]["majority_baseline"],
        "frozen_vqa_accuracy": frozen["metrics"]["vqa_accuracy"],
    }
    by_type = {name: {**row, "motion": name in MOTION_TYPES}
               for name, row in by_type_with_control(qa, frozen, "frozen_vqa_accuracy").items()}
    motion_types = sorted(name for name in by_type if name in MOTION_TYPES)
    n_motion = sum(by_type[name]["samples"] for name in motion_types)
    motion = {
        "types": motion_types,
        "samples": n_motion,
        "vqa_accuracy": _mean([float(r["score"]) for r in qa["records"] if r.get("type") in MOTION_TYPES]),
        "frozen_vqa_accuracy": _mean([float(r["score"]) for r in frozen["records"] if r.get("type") in MOTION_TYPES]),
        "majority_baseline": (sum(by_type[t]["majority_baseline"] * by_type[t]["samples"] for t in motion_types)
                              / n_motion if n_motion else None),
    }
    clips = {r.get("video_key") or r["key"] for r in qa["records"]}
    return {"metrics": metrics, "motion": motion, "vqa_by_type": by_type,
            "samples": {"questions": qa["counts"]["samples"], "clips": len(clips)}}


def metric_rows(part: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` metric-table rows of the ``video`` part of metrics.json."""
    m, n, motion = part["metrics"], part["samples"], part["motion"]
    rows = [
        (f"video QA accuracy ({n['questions']} test questions, {n['clips']} clip{'' if n['clips'] == 1 else 's'})", pct(m["vqa_accuracy"])),
        ("video QA majority-answer baseline (per question type)", pct(m["majority_baseline"])),
        ("video QA accuracy, frozen frame", pct(m["frozen_vqa_accuracy"])),
        (f"video QA accuracy, motion types ({motion['samples']})",
         f"{pct(motion['vqa_accuracy'])} (frozen {pct(motion['frozen_vqa_accuracy'])}, "
         f"majority {pct(motion['majority_baseline'])})"),
    ]
    for name, stats in part.get("vqa_by_type", {}).items():
        rows.append((f"video QA accuracy, type {name}{' (motion)' if stats.get('motion') else ''} ({stats['samples']})",
                     f"{pct(stats['vqa_accuracy'])} (frozen {pct(stats.get('frozen_vqa_accuracy'))}, "
                     f"majority {pct(stats['majority_baseline'])})"))
    return rows


def clip_media(mp4: bytes, name: str) -> tuple[bytes, bytes]:
    """``(animated GIF, PNG frame strip)`` of a clip: every decoded frame at the clip's frame rate, looping,
    and `STRIP_FRAMES` frames side by side. Raises `DecodeError` for a clip that does not decode."""
    from PIL import Image

    from mm_llama.data.decoders import decode_video, uniform_frame_indices, video_duration, video_frame_count

    count = video_frame_count(mp4, name)
    frames = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in decode_video(mp4, name, count)]  # [H, W, 3] each
    duration = video_duration(mp4, name)
    frame_ms = max(20, round(1000 * duration / count)) if duration > 0 else 125
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    picks = [frames[i] for i in uniform_frame_indices(count, STRIP_FRAMES)]
    width, height, gap = picks[0].width, picks[0].height, 2
    strip = Image.new("RGB", (len(picks) * width + (len(picks) - 1) * gap, height), (255, 255, 255))
    for k, frame in enumerate(picks):
        strip.paste(frame, (k * (width + gap), 0))
    png = io.BytesIO()
    strip.save(png, format="PNG")
    return gif.getvalue(), png.getvalue()


def clips(results: Results, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` clips of the qa records, in reading order: ``{"key", "mp4", "questions"}`` where
    ``key`` is the clip's ``video_key``, ``mp4`` the bytes of its first question's ``KEY.mp4`` (None if not
    found) and ``questions`` its qa records, each with its ``frozen`` answer."""
    frozen = {r["key"]: r["prediction"] for r in results["qa_frozen"]["records"]}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in results["qa"]["records"]:
        key = r.get("video_key") or r["key"]
        if key in grouped or len(grouped) < limit:
            grouped.setdefault(key, []).append({**r, "frozen": frozen.get(r["key"])})
    members = shard_members((qs[0]["shard"], f"{qs[0]['key']}.mp4") for qs in grouped.values())
    return [{"key": key, "mp4": members.get((qs[0]["shard"], f"{qs[0]['key']}.mp4")), "questions": qs}
            for key, qs in grouped.items()]


def _media_html(clip: Mapping[str, Any]) -> str:
    from mm_llama.data.decoders import DecodeError

    if not clip.get("mp4"):
        return '<span class="muted">(clip not found)</span>'
    try:
        gif, strip = clip_media(clip["mp4"], f"{clip['questions'][0]['key']}.mp4")
    except DecodeError as err:
        return f'<span class="muted">(clip not decoded: {esc(err)})</span>'
    key = esc(clip["key"])
    return (f'<img class="clip" src="{data_uri(gif, "image/gif")}" alt="{key} (animated)"><br>'
            f'<img class="strip" src="{data_uri(strip, "image/png")}" alt="{key} (frames)">')


def _clip_html(clip: Mapping[str, Any]) -> str:
    return "".join([f'<div class="sample"><div>{_media_html(clip)}<br><span class="muted">{esc(clip["key"])}</span>'
                    "</div><div>", question_table(clip["questions"], "frozen frame", "frozen", _motion_note),
                    "</div></div>"])


def _motion_note(qtype: str) -> str:
    return ' <span class="muted">(motion)</span>' if qtype in MOTION_TYPES else ""


def section_html(results: Results, part: Mapping[str, Any], limit: int) -> str:
    """The video section: what the frozen-frame control means, then the first ``limit`` clips."""
    shown = clips(results, limit)
    n = part["samples"]
    return "".join([
        f"<h2>Video ({n['questions']} test questions on {n['clips']} clips; {len(shown)} clips shown)</h2>",
        "<p>The frozen-frame rows are the same questions with every frame replaced by the clip's first: the "
        "shapes stay, the motion goes. Motion questions (", esc(", ".join(sorted(MOTION_TYPES))),
        ") need more than the first frame; count and start colour do not. Each clip is shown animated and as ",
        f"{STRIP_FRAMES} frames from first to last.</p>",
        "".join(_clip_html(c) for c in shown)])


VIDEO = Modality("video", VideoEvals, TASKS, summarize, metric_rows, section_html)
"""The video section of the report (`report.write_report`'s ``video=``)."""
