"""What :func:`~mm_llama.train.evaluation.evaluate` returns and how it is stored and shown:
:class:`EvalResult`, :func:`write_result` (JSON, atomically), :func:`format_metrics` (a table)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from mm_llama.atomic_file import atomic_write

__all__ = ["EvalResult", "check_result_path", "format_metrics", "write_result"]


@dataclass
class EvalResult:
    """The outcome of :func:`evaluate`.

    task: ``caption``, ``vqa``, ``asr`` or ``ast``.
    metrics: ``caption``: ``cider``, ``exact_match``; ``vqa``: ``vqa_accuracy``, ``exact_match``,
        ``majority_baseline`` (all in [0, 1] except CIDEr, which is ≥ 0); ``asr``: ``wer`` (a fraction,
        may exceed 1); ``ast``: ``bleu`` (0-100).
    by_type: ``vqa`` only: per question type, ``{"samples", "vqa_accuracy", "majority_baseline",
        "majority_answer"}``.
    counts: ``samples`` (evaluated), ``skipped_samples`` (samples skipped: undecodable, missing
        fields, empty references), ``damaged_shards`` (shards that could not be read to the end),
        ``shards``, ``empty_references`` (of the skipped samples, those whose reference answer or caption
        is empty or whitespace: training skips them as having no labelled token, so they are not scored).
    skipped: one ``{"shard", "key", "reason"}`` per skipped sample or damaged shard (``key`` None).
    settings: how the run was made (shards, batch size, blank images, generation budget, ...).
    records: one dict per evaluated sample, in reading order: ``key``, ``shard``, ``prompt`` (caption)
        or ``question``, ``type`` and ``image_key`` (vqa; KEY.json's ``image_key`` or None), ``prediction``,
        ``references`` (always a list), and the sample's own scores (``cider`` or ``score``, and
        ``exact_match``).
    """

    task: str
    metrics: dict[str, float]
    counts: dict[str, int]
    settings: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the content of :func:`write_result`'s file)."""
        return {
            "task": self.task,
            "metrics": dict(self.metrics),
            "by_type": {k: dict(v) for k, v in self.by_type.items()},
            "counts": dict(self.counts),
            "settings": dict(self.settings),
            "skipped": [dict(s) for s in self.skipped],
            "records": [dict(r) for r in self.records],
        }


def write_result(
    result: EvalResult, path: str | os.PathLike[str], *, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write ``result`` as one JSON object (metrics, by_type, counts, settings, skipped, records).

    ``settings`` adds entries to the stored settings (e.g. the model path a command was given).
    Parent folders are created; the file is written to ``PATH.tmp`` and renamed, so a reader never
    sees half a file. Returns the path.
    """
    out = check_result_path(path)
    data = result.to_dict()
    if settings:
        data["settings"].update({k: _jsonable(v) for k, v in settings.items()})
    try:
        return atomic_write(out, json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    except OSError as err:
        raise ValueError(f"cannot write the result to {str(out)!r}: {err.strerror or err}; "
                         "choose another path") from err


def check_result_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a result file that can be written: its folder is created; raises ValueError naming the
    path when it is a directory, lies under a file, or its folder cannot be created. Call it before a
    long evaluation, so that a bad ``--out`` fails at once."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(
            f"result path {str(out)!r} is a directory; give a file name such as {str(out / 'eval.json')!r}"
        )
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"result path {str(out)!r} cannot be written: {str(blocking)!r} is a file, not a folder; "
                         "choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"result path {str(out)!r} cannot be written: {err.strerror or err} ({err.filename}); "
                         "choose another path") from err
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"result path {str(out)!r} cannot be written: its folder is not writable; choose another path")
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    return value


_METRIC_LABELS = {
    "cider": "CIDEr",
    "exact_match": "exact match",
    "vqa_accuracy": "VQA accuracy",
    "majority_baseline": "majority-answer baseline",
    "wer": "WER (Whisper-normalised)",
    "bleu": "BLEU (sacreBLEU)",
}
_PLAIN_METRICS = {"cider": "{:.4f}", "bleu": "{:.2f}"}  # the rest are fractions, shown as percentages


def format_metrics(result: EvalResult) -> str:
    """A small text table of the metrics, the per-type VQA accuracies and the sample counts."""
    rows = [(_METRIC_LABELS.get(k, k), _PLAIN_METRICS[k].format(v) if k in _PLAIN_METRICS else f"{100 * v:.1f}%")
            for k, v in result.metrics.items()]
    for name, stats in sorted(result.by_type.items()):
        rows.append((f"  type {name} ({stats['samples']})",
                     f"{100 * stats['vqa_accuracy']:.1f}% (majority {100 * stats['majority_baseline']:.1f}%)"))
    counts = result.counts
    rows.append(("samples", str(counts.get("samples", 0))))
    if counts.get("skipped_samples") or counts.get("damaged_shards"):
        empty = counts.get("empty_references", 0)
        rows.append(("skipped", f"{counts.get('skipped_samples', 0)} samples"
                                f"{f' ({empty} with an empty reference)' if empty else ''}, "
                                f"{counts.get('damaged_shards', 0)} damaged shards"))
    width = max(len(name) for name, _ in rows)
    title = f"{result.task}{' (blank images)' if result.settings.get('blank_images') else ''}"
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
