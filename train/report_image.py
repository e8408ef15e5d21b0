"""The image part of the demo report: VQA and captions, each beside its blank-image control.

metrics.json's ``image`` part (`summarize`)::

    {"metrics": {"vqa_accuracy", "vqa_exact_match", "majority_baseline", "blank_vqa_accuracy",
                 "caption_cider", "caption_exact_match", "blank_caption_cider", "blank_caption_exact_match"},
     "vqa_by_type": {TYPE: {"samples", "vqa_accuracy", "blank_vqa_accuracy", "majority_baseline",
                            "majority_answer"}},
     "samples": {"vqa": questions, "caption": images}}

Accuracies are in [0, 1]; CIDEr is ≥ 0. The HTML section shows the first test images (PNG read back from
the caption result's shards), each with its generated and reference caption and its questions with the
model's answer, the reference, a mark and the blank-image answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_llama.train.report_common import Modality, Results, by_type_with_control, pct, shard_members
from mm_llama.train.report_html import data_uri, esc, question_table, text

__all__ = ["IMAGE", "ImageEvals", "metric_rows", "section_html", "summarize"]


@dataclass(frozen=True)
class ImageEvals:
    """`write_result` files of the image evaluations: ``vqa`` and ``caption`` results, and the same two
    with every image replaced by a grey one (``blank_images=True``)."""

    vqa: Path
    vqa_blank: Path
    caption: Path
    caption_blank: Path


TASKS = {"vqa": "vqa", "vqa_blank": "vqa", "caption": "caption", "caption_blank": "caption"}


def summarize(results: Results) -> dict[str, Any]:
    """The ``image`` part of metrics.json (see the module docstring) from the four results."""
    vqa, vqa_blank, caption, caption_blank = (results[k] for k in ("vqa", "vqa_blank", "caption", "caption_blank"))
    metrics = {
        "vqa_accuracy": vqa["metrics"]["vqa_accuracy"],
        "vqa_exact_match": vqa["metrics"]["exact_match"],
        "majority_baseline": vqa["metrics"]["majority_baseline"],
        "blank_vqa_accuracy": vqa_blank["metrics"]["vqa_accuracy"],
        "caption_cider": caption["metrics"]["cider"],
        "caption_exact_match": caption["metrics"]["exact_match"],
        "blank_caption_cider": caption_blank["metrics"]["cider"],
        "blank_caption_exact_match": caption_blank["metrics"]["exact_match"],
    }
    by_type = by_type_with_control(vqa, vqa_blank, "blank_vqa_accuracy")
    samples = {"vqa": vqa["counts"]["samples"], "caption": caption["counts"]["samples"]}
    return {"metrics": metrics, "vqa_by_type": by_type, "samples": samples}


def metric_rows(part: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` metric-table rows of the ``image`` part of metrics.json."""
    m, n = part["metrics"], part["samples"]
    rows = [
        (f"VQA accuracy ({n['vqa']} test questions)", pct(m["vqa_accuracy"])),
        ("majority-answer baseline (per question type)", pct(m["majority_baseline"])),
        ("VQA accuracy, blank images", pct(m["blank_vqa_accuracy"])),
        (f"caption CIDEr ({n['caption']} test images)", f"{m['caption_cider']:.3f}"),
        ("caption exact match", pct(m["caption_exact_match"])),
        ("caption CIDEr, blank images", f"{m['blank_caption_cider']:.3f}"),
    ]
    for name, stats in part.get("vqa_by_type", {}).items():
        rows.append((f"VQA accuracy, type {name} ({stats['samples']})",
                     f"{pct(stats['vqa_accuracy'])} (blank {pct(stats.get('blank_vqa_accuracy'))}, "
                     f"majority {pct(stats['majority_baseline'])})"))
    return rows


def samples(results: Results, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` captioned test images: each caption record with its ``png`` (bytes or None),
    ``blank`` (the blank-image caption) and ``questions`` (its VQA records, each with its ``blank`` answer)."""
    shown = results["caption"]["records"][:limit]
    blank_captions = {r["key"]: r["prediction"] for r in results["caption_blank"]["records"]}
    blank_answers = {r["key"]: r["prediction"] for r in results["vqa_blank"]["records"]}
    members = shard_members((r["shard"], f"{r['key']}.png") for r in shown)
    questions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results["vqa"]["records"]:
        if r.get("image_key") is not None:  # the image-caption record of the question's image
            questions[r["image_key"]].append({**r, "blank": blank_answers.get(r["key"])})
    return [{**r, "png": members.get((r["shard"], f"{r['key']}.png")), "blank": blank_captions.get(r["key"]),
             "questions": questions.get(r["key"], [])} for r in shown]


def _sample_html(sample: Mapping[str, Any]) -> str:
    image = (f'<img class="still" src="{data_uri(sample["png"], "image/png")}" alt="{esc(sample["key"])}">'
             if sample.get("png") else '<span class="muted">(image not found)</span>')
    refs = " / ".join(esc(r) for r in sample["references"])
    parts = [f'<div class="sample"><div>{image}<br><span class="muted">{esc(sample["key"])}</span></div><div>',
             f'<p><b>generated caption:</b> {text(sample["prediction"])}<br><b>reference:</b> {refs}<br>'
             f'<span class="muted">blank image: {text(sample.get("blank"))}</span></p>']
    if sample["questions"]:
        parts.append(question_table(sample["questions"], "blank image", "blank"))
    parts.append("</div></div>")
    return "".join(parts)


def section_html(results: Results, part: Mapping[str, Any], limit: int) -> str:
    """The image section: what the blank-image control means, then the first ``limit`` test images."""
    shown = samples(results, limit)
    n = part["samples"]
    return "".join([
        f"<h2>Images ({n['vqa']} test questions, {n['caption']} captions; {len(shown)} images shown)</h2>",
        "<p>The blank-image rows are the same questions and prompts with every image replaced by a grey one: "
        "what the model gets from the text alone. The majority-answer baseline always gives the most common "
        "answer of each question type.</p>",
        "".join(_sample_html(s) for s in shown)])


IMAGE = Modality("image", ImageEvals, TASKS, summarize, metric_rows, section_html)
"""The image section of the report (`report.write_report`'s ``image=``)."""
