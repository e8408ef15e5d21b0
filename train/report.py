"""The demo's report: ``metrics.json``, a self-contained ``report.html`` and ``loss-<stage>.png`` curves.

`write_report` reads the four evaluation results that `mm_llama.train.evaluation.write_result` wrote
(VQA and captions, each also with blank images) and each training run's ``metrics.jsonl`` (``step``,
``loss``), and writes into the demo folder:

- ``metrics.json``: the headline metrics (`summarize`), per-question-type VQA accuracies, sample counts,
  each stage's wall time and the settings;
- ``loss-<stage>.png``: the training loss of every stage (matplotlib, Agg canvas, no pyplot state);
- ``report.html``: one file with everything embedded (PNG data URIs): the metrics table (blank-image
  control and majority-answer baseline beside the real numbers), test images each next to its generated
  and reference caption and its questions with the model's answer, the reference and a correct mark,
  the loss curves and the stage times. All text is escaped with `html.escape`.

`format_table` renders the same metric rows as a Markdown table (what `mm-llama demo` prints).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tarfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mm_llama.atomic_file import atomic_write
from mm_llama.train.metrics import METRICS_FILE, read_metrics_file

__all__ = ["LOSS_PLOT_GLOB", "METRICS_JSON", "REPORT_FILE", "format_table", "loss_points", "metric_rows",
           "plot_loss", "summarize", "write_report"]

METRICS_JSON = "metrics.json"
REPORT_FILE = "report.html"
LOSS_PLOT_GLOB = "loss-*.png"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the evaluation result {path}: {err}; rerun the demo with --resume") from err


# ------------------------------------------------------------------------------------------ metrics
def summarize(vqa: Mapping[str, Any], vqa_blank: Mapping[str, Any], caption: Mapping[str, Any],
              caption_blank: Mapping[str, Any]) -> dict[str, Any]:
    """Headline metrics from four `EvalResult.to_dict()` results: ``{"metrics": {...}, "vqa_by_type": {...},
    "samples": {...}}``. Accuracies are in [0, 1]; CIDEr is ≥ 0."""
    for name, result, task in (("vqa", vqa, "vqa"), ("vqa_blank", vqa_blank, "vqa"), ("caption", caption, "caption"),
                               ("caption_blank", caption_blank, "caption")):
        if result.get("task") != task:
            raise ValueError(f"{name}: expected a {task} evaluation result, got task {result.get('task')!r}")
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
    blank_types = vqa_blank.get("by_type", {})
    by_type = {
        name: {"samples": stats["samples"], "vqa_accuracy": stats["vqa_accuracy"],
               "blank_vqa_accuracy": blank_types.get(name, {}).get("vqa_accuracy"),
               "majority_baseline": stats["majority_baseline"], "majority_answer": stats["majority_answer"]}
        for name, stats in sorted(vqa.get("by_type", {}).items())
    }
    samples = {"vqa": vqa["counts"]["samples"], "caption": caption["counts"]["samples"]}
    return {"metrics": metrics, "vqa_by_type": by_type, "samples": samples}


def metric_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the metrics table from a `write_report` result (metrics.json's content)."""
    m, n = report["metrics"], report["samples"]
    rows = [
        (f"VQA accuracy ({n['vqa']} test questions)", _pct(m["vqa_accuracy"])),
        ("majority-answer baseline (per question type)", _pct(m["majority_baseline"])),
        ("VQA accuracy, blank images", _pct(m["blank_vqa_accuracy"])),
        (f"caption CIDEr ({n['caption']} test images)", f"{m['caption_cider']:.3f}"),
        ("caption exact match", _pct(m["caption_exact_match"])),
        ("caption CIDEr, blank images", f"{m['blank_caption_cider']:.3f}"),
    ]
    for name, stats in report.get("vqa_by_type", {}).items():
        blank = stats.get("blank_vqa_accuracy")
        rows.append((f"VQA accuracy, type {name} ({stats['samples']})",
                     f"{_pct(stats['vqa_accuracy'])} (blank {_pct(blank) if blank is not None else 'n/a'}, "
                     f"majority {_pct(stats['majority_baseline'])})"))
    for name, seconds in report.get("stage_seconds", {}).items():
        rows.append((f"wall time: {name}", f"{seconds:.1f} s"))
    if "total_seconds" in report:
        rows.append(("wall time: total", f"{report['total_seconds']:.1f} s"))
    return rows


def format_table(report: Mapping[str, Any]) -> str:
    """The metric rows as a Markdown table."""
    rows = metric_rows(report)
    width = max(len("metric"), *(len(label) for label, _ in rows))
    vwidth = max(len("value"), *(len(value) for _, value in rows))
    lines = [f"| {'metric':<{width}} | {'value':<{vwidth}} |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|"]
    lines += [f"| {label:<{width}} | {value:<{vwidth}} |" for label, value in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ loss curves
def loss_points(metrics_jsonl: str | os.PathLike[str]) -> list[tuple[int, float]]:
    """``(step, loss)`` of every line of a run's metrics.jsonl that has a finite training ``loss``."""
    points = []
    for record in read_metrics_file(metrics_jsonl):
        loss, step = record.get("loss"), record.get("step")
        if isinstance(loss, (int, float)) and isinstance(step, int) and math.isfinite(loss):
            points.append((step, float(loss)))
    return points


def plot_loss(points: list[tuple[int, float]], target: str | os.PathLike[str], title: str) -> Path:
    """Write a PNG of the loss curve (``points`` from `loss_points`) to ``target``; returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 30 else None, linewidth=1.5)
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return atomic_write(target, png.getvalue())


def _run_title(stage: str, run: Path) -> str:
    """``"lm (tiny_lm_pretrain): training loss"``: the stage and the recipe its run's config.yaml names."""
    import yaml

    from mm_llama.train.recipe import CONFIG_FILE

    try:
        recipe = yaml.safe_load((run / CONFIG_FILE).read_text()).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        recipe = None
    return f"{stage} ({recipe}): training loss" if recipe else f"{stage}: training loss"


# ------------------------------------------------------------------------------------------ samples
def _tar_members(shard: str, names: set[str]) -> dict[str, bytes]:
    """The named members of one tar shard (missing ones are left out)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name in names and member.isfile():
                    data = tar.extractfile(member)
                    if data is not None:
                        found[member.name] = data.read()
    except (OSError, tarfile.TarError):
        pass  # the report shows the sample without its image
    return found


def _samples(caption: Mapping[str, Any], caption_blank: Mapping[str, Any], vqa: Mapping[str, Any],
             vqa_blank: Mapping[str, Any], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` captioned test images with their PNG, captions and questions."""
    shown = caption["records"][:limit]
    blank_captions = {r["key"]: r["prediction"] for r in caption_blank.get("records", [])}
    blank_answers = {r["key"]: r["prediction"] for r in vqa_blank.get("records", [])}
    by_shard: dict[str, set[str]] = defaultdict(set)
    for r in shown:
        by_shard[r["shard"]].add(f"{r['key']}.png")
    members: dict[tuple[str, str], bytes] = {}
    for shard, names in by_shard.items():
        members.update({(shard, name): data for name, data in _tar_members(shard, names).items()})
    questions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in vqa.get("records", []):
        if r.get("image_key") is not None:  # the image-caption record of the question's image
            questions[r["image_key"]].append({**r, "blank": blank_answers.get(r["key"])})
    return [{**r, "png": members.get((r["shard"], f"{r['key']}.png")), "blank": blank_captions.get(r["key"]),
             "questions": questions.get(r["key"], [])} for r in shown]


# ------------------------------------------------------------------------------------------ HTML
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.sample { display: flex; gap: 1.2em; border-top: 1px solid #ddd; padding: 1em 0; }
.sample img { image-rendering: pixelated; border: 1px solid #999; width: 192px; height: auto; }
.ok { color: #087f23; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
.muted { color: #777; } .curves img { margin: 0 1em 1em 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _text(prediction: Any) -> str:
    """An escaped prediction; an empty one is shown as such."""
    return _e(prediction) if prediction else '<span class="muted">(empty)</span>'


def _mark(score: float) -> str:
    if score >= 1.0:
        return '<span class="ok">&#10003;</span>'
    if score <= 0.0:
        return '<span class="bad">&#10007;</span>'
    return f"{score:.2f}"


def _sample_html(sample: Mapping[str, Any]) -> str:
    image = (f'<img src="{_data_uri(sample["png"])}" alt="{_e(sample["key"])}">' if sample.get("png")
             else '<span class="muted">(image not found)</span>')
    refs = " / ".join(_e(r) for r in sample["references"])
    parts = [f'<div class="sample"><div>{image}<br><span class="muted">{_e(sample["key"])}</span></div><div>',
             f'<p><b>generated caption:</b> {_text(sample["prediction"])}<br><b>reference:</b> {refs}<br>'
             f'<span class="muted">blank image: {_text(sample.get("blank"))}</span></p>']
    if sample["questions"]:
        parts.append("<table><tr><th>question</th><th>type</th><th>model</th><th>reference</th><th></th>"
                     "<th>blank image</th></tr>")
        for q in sample["questions"]:
            parts.append(f"<tr><td>{_e(q['question'])}</td><td>{_e(q.get('type', ''))}</td>"
                         f"<td>{_text(q['prediction'])}</td><td>{_e(' / '.join(q['references']))}</td>"
                         f"<td>{_mark(float(q.get('score', 0.0)))}</td>"
                         f"<td class=\"muted\">{_text(q.get('blank'))}</td></tr>")
        parts.append("</table>")
    parts.append("</div></div>")
    return "".join(parts)


def _html(report: Mapping[str, Any], samples: list[dict[str, Any]], curves: dict[str, Path]) -> str:
    rows = "".join(f"<tr><td>{_e(label)}</td><td>{_e(value)}</td></tr>" for label, value in metric_rows(report))
    s = report.get("settings", {})
    about = (f"{s.get('train_images')} training images, {s.get('text_documents')} text documents, "
             f"vocabulary {s.get('vocab_size')}; test split: {report['samples']['vqa']} questions, "
             f"{report['samples']['caption']} captions") if s else ""
    curve_html = "".join(
        f'<figure><img src="{_data_uri(path.read_bytes())}" alt="loss {_e(name)}"><figcaption>{_e(name)} '
        f"({_e(path.name)})</figcaption></figure>" for name, path in curves.items())
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>mm-llama demo report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>mm-llama demo</h1>",
        f"<p>{_e(about)}. The blank-image rows are the same questions and prompts with every image replaced by "
        "a grey one: what the model gets from the text alone. The majority-answer baseline always gives the "
        "most common answer of each question type.</p>",
        "<h2>Metrics (held-out test split)</h2>", f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>",
        f"<h2>Test images ({len(samples)} shown)</h2>", "".join(_sample_html(x) for x in samples),
        '<h2>Training loss</h2><div class="curves">', curve_html, "</div>",
        "</body></html>", ""])


# ------------------------------------------------------------------------------------------ entry point
def write_report(out: str | os.PathLike[str], *, vqa: Path, vqa_blank: Path, caption: Path, caption_blank: Path,
                 runs: Mapping[str, Path], stage_seconds: Mapping[str, float], settings: Mapping[str, Any],
                 report_images: int) -> dict[str, Any]:
    """Write ``metrics.json``, ``loss-<stage>.png`` per training run and ``report.html`` into ``out``.

    ``vqa`` … ``caption_blank``: `write_result` files. ``runs``: stage name → run folder (its
    metrics.jsonl). ``stage_seconds``: wall time per stage (the total is their sum). ``settings``: stored
    as is. ``report_images``: test images shown. Returns metrics.json's content.
    """
    out = Path(out)
    results = {name: _read_json(path) for name, path in
               (("vqa", vqa), ("vqa_blank", vqa_blank), ("caption", caption), ("caption_blank", caption_blank))}
    report = summarize(**results)
    report["stage_seconds"] = {k: round(float(v), 3) for k, v in stage_seconds.items()}
    report["total_seconds"] = round(sum(float(v) for v in stage_seconds.values()), 3)
    report["files"] = {name: os.path.relpath(path, out) for name, path in
                       (("vqa", vqa), ("vqa_blank", vqa_blank), ("caption", caption), ("caption_blank", caption_blank))}
    report["settings"] = dict(settings)
    curves = {name: plot_loss(loss_points(run / METRICS_FILE), out / f"loss-{name}.png", _run_title(name, run))
              for name, run in runs.items()}
    report["loss_plots"] = {name: path.name for name, path in curves.items()}
    samples = _samples(results["caption"], results["caption_blank"], results["vqa"], results["vqa_blank"],
                       report_images)
    atomic_write(out / METRICS_JSON, json.dumps(report, indent=1, allow_nan=False) + "\n")
    atomic_write(out / REPORT_FILE, _html(report, samples, curves))
    return report
