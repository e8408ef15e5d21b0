"""The demo's report: ``metrics.json``, a self-contained ``report.html`` and ``loss-<stage>.png`` curves.

`write_report` takes the evaluation results that `mm_llama.train.evaluation.write_result` wrote for any
subset of the modalities, each with its control, and each training run's ``metrics.jsonl``:

- ``image=ImageEvals(vqa, vqa_blank, caption, caption_blank)``: blank-image control (`report_image`);
- ``video=VideoEvals(qa, qa_frozen)``: video QA, frozen-frame control (`report_video`);
- ``speech=SpeechEvals(asr, asr_silence)``: ASR, silence control (`report_speech`).

It writes into the demo folder:

- ``metrics.json``: ``{"image": {...}, "video": {...}, "speech": {...}`` (only the modalities given; each
  module's docstring shows its part), ``"stage_seconds"``, ``"total_seconds"``, ``"files"`` (the result
  files per modality, relative to the folder), ``"settings"``, ``"loss_plots"``};
- ``loss-<stage>.png``: the training loss of every run (`report_loss`);
- ``report.html``: one file with everything embedded as data URIs: the metrics table (controls and
  baselines beside the real numbers), a section per modality with its test media (images, animated clips,
  playable utterances) beside the model's outputs, the loss curves and the settings. All text is escaped.

`format_table` renders the same metric rows as a Markdown table (what `mm-llama demo` prints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mm_llama.atomic_file import atomic_write
from mm_llama.train.report_common import Modality
from mm_llama.train.report_html import STYLE, esc
from mm_llama.train.report_image import IMAGE, ImageEvals
from mm_llama.train.report_loss import LOSS_PLOT_GLOB, curves_html, loss_points, plot_loss, write_loss_plots
from mm_llama.train.report_speech import SPEECH, SpeechEvals
from mm_llama.train.report_video import VIDEO, VideoEvals

__all__ = ["LOSS_PLOT_GLOB", "METRICS_JSON", "MODALITIES", "REPORT_FILE", "ImageEvals", "SpeechEvals", "VideoEvals",
           "format_table", "loss_points", "metric_rows", "plot_loss", "write_report"]

METRICS_JSON = "metrics.json"
REPORT_FILE = "report.html"
MODALITIES: dict[str, Modality] = {m.name: m for m in (IMAGE, VIDEO, SPEECH)}
"""The report's sections, in page and table order."""


def metric_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the metrics table from a `write_report` result (metrics.json's content):
    the rows of every modality it holds, then the wall time of each stage and the total."""
    rows = [row for name, modality in MODALITIES.items() if name in report for row in modality.rows(report[name])]
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


def _settings_html(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                   for k, v in settings.items())
    return f"<details><summary>Settings</summary><table><tr><th>setting</th><th>value</th></tr>{rows}</table></details>"


def _html(report: Mapping[str, Any], sections: list[str], curves: Mapping[str, Path]) -> str:
    rows = "".join(f"<tr><td>{esc(label)}</td><td>{esc(value)}</td></tr>" for label, value in metric_rows(report))
    shown = ", ".join(name for name in MODALITIES if name in report)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>mm-llama demo report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>mm-llama demo</h1>",
        f"<p>Modalities: {esc(shown)}. Every number is on the held-out test split; each modality's control "
        "(blank images, frozen frames, silence) asks the same questions without the media's content.</p>",
        "<h2>Metrics (held-out test split)</h2>", f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>",
        *sections, curves_html(curves), _settings_html(report.get("settings", {})),
        "</body></html>", ""])


def write_report(out: str | os.PathLike[str], *, image: ImageEvals | None = None, video: VideoEvals | None = None,
                 speech: SpeechEvals | None = None, runs: Mapping[str, Path], stage_seconds: Mapping[str, float],
                 settings: Mapping[str, Any], report_samples: int) -> dict[str, Any]:
    """Write ``metrics.json``, ``loss-<stage>.png`` per training run and ``report.html`` into ``out``.

    ``image`` / ``video`` / ``speech``: the modality's `write_result` files (at least one is required).
    ``runs``: stage name → run folder (its metrics.jsonl). ``stage_seconds``: wall time per stage (the
    total is their sum). ``settings``: stored as is (JSON-ready values). ``report_samples``: test samples
    shown per modality (images, clips, utterances). Returns metrics.json's content.

    ``out`` is created if missing. Raises ValueError when no modality is given, ``report_samples`` is not
    a non-negative integer, or a result file cannot be read or holds another task; TypeError for a
    modality given the wrong class. Nothing is written before every result has been read and checked.
    """
    given = {name: evals for name, evals in (("image", image), ("video", video), ("speech", speech))
             if evals is not None}
    if not given:
        raise ValueError("write_report needs the results of at least one modality: image=ImageEvals(...), "
                         "video=VideoEvals(...) or speech=SpeechEvals(...)")
    if isinstance(report_samples, bool) or not isinstance(report_samples, int) or report_samples < 0:
        raise ValueError(f"report_samples must be a non-negative integer, got {report_samples!r}")
    out = Path(out)
    results = {name: MODALITIES[name].read(evals) for name, evals in given.items()}
    report: dict[str, Any] = {name: MODALITIES[name].summarize(res) for name, res in results.items()}
    report["stage_seconds"] = {k: round(float(v), 3) for k, v in stage_seconds.items()}
    report["total_seconds"] = round(sum(float(v) for v in stage_seconds.values()), 3)
    report["files"] = {name: {field: os.path.relpath(path, out)
                              for field, path in MODALITIES[name].paths(evals).items()} for name, evals in given.items()}
    report["settings"] = dict(settings)
    out.mkdir(parents=True, exist_ok=True)
    curves = write_loss_plots(out, runs)
    report["loss_plots"] = {name: path.name for name, path in curves.items()}
    sections = [MODALITIES[name].section(res, report[name], report_samples) for name, res in results.items()]
    atomic_write(out / METRICS_JSON, json.dumps(report, indent=1, allow_nan=False) + "\n")
    atomic_write(out / REPORT_FILE, _html(report, sections, curves))
    return report
