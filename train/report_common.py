"""What every section of the demo report shares: the `Modality` a section module describes itself with,
reading and checking evaluation result files, reading media back from tar shards, and number formats."""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["Modality", "Results", "by_type_with_control", "pct", "read_result", "read_results", "shard_members"]

Results = Mapping[str, Mapping[str, Any]]
"""One modality's evaluation results by field name of its evals class (``{"qa": {...}, "qa_frozen": {...}}``),
each the content of a `write_result` file (`EvalResult.to_dict()`)."""


@dataclass(frozen=True)
class Modality:
    """One section of the report (``report_image.IMAGE``, ``report_video.VIDEO``, ``report_speech.SPEECH``).

    name: the key of its part of metrics.json (``image``, ``video``, ``speech``).
    evals: its frozen dataclass of result paths (`ImageEvals`, ...); every field is one `write_result` file.
    tasks: field name → the ``task`` that file must hold (``{"qa": "video_qa", ...}``).
    summarize: results → its part of metrics.json (``{"metrics": {...}, ...}``).
    rows: its part of metrics.json → ``(label, value)`` rows of the metrics table.
    section: (results, its part of metrics.json, samples to show) → its HTML section, media embedded.
    """

    name: str
    evals: type
    tasks: Mapping[str, str]
    summarize: Callable[[Results], dict[str, Any]]
    rows: Callable[[Mapping[str, Any]], list[tuple[str, str]]]
    section: Callable[[Results, Mapping[str, Any], int], str]

    def paths(self, evals: Any) -> dict[str, Path]:
        """Field name → result path of an instance of `evals`; TypeError for anything else."""
        if not isinstance(evals, self.evals):
            raise TypeError(f"{self.name}= takes {self.evals.__name__}(...), got {type(evals).__name__} {evals!r:.120}")
        return {f.name: Path(getattr(evals, f.name)) for f in fields(evals)}

    def read(self, evals: Any) -> dict[str, dict[str, Any]]:
        """Read and check every result file of ``evals`` (see `read_results`)."""
        return read_results(self.paths(evals), self.tasks)


def read_result(path: Path, task: str, what: str) -> dict[str, Any]:
    """The content of one `write_result` file, checked to hold ``task`` with a records list; ValueError
    naming ``what`` (``"video qa_frozen"``) and the path otherwise."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the {what} evaluation result {path}: {err}; "
                         "rerun the demo with --resume") from err
    if not isinstance(result, dict) or result.get("task") != task:
        got = result.get("task") if isinstance(result, dict) else type(result).__name__
        raise ValueError(f"{what}: expected a {task} evaluation result in {path}, got task {got!r}")
    if not isinstance(result.get("records"), list) or not isinstance(result.get("metrics"), dict):
        raise ValueError(f"{what}: {path} has no records list or metrics; is it a write_result file?")
    return result


def read_results(paths: Mapping[str, Path], tasks: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`read_result` of every ``name → path``, each checked against ``tasks[name]``."""
    return {name: read_result(path, tasks[name], name) for name, path in paths.items()}


def by_type_with_control(result: Mapping[str, Any], control: Mapping[str, Any], control_key: str) -> dict[str, Any]:
    """Question type → its samples, accuracy, majority baseline and answer in ``result``, and its accuracy
    in the ``control`` result under ``control_key`` (None for a type the control did not score)."""
    control_types = control.get("by_type", {})
    return {
        name: {"samples": stats["samples"], "vqa_accuracy": stats["vqa_accuracy"],
               control_key: control_types.get(name, {}).get("vqa_accuracy"),
               "majority_baseline": stats["majority_baseline"], "majority_answer": stats["majority_answer"]}
        for name, stats in sorted(result.get("by_type", {}).items())
    }


def shard_members(wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """``(shard, member name) → bytes`` of the wanted members, each shard read once. Members or shards that
    cannot be read are left out: the report then shows the sample without its media."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for shard, name in wanted:
        by_shard[shard].add(name)
    found: dict[tuple[str, str], bytes] = {}
    for shard, names in by_shard.items():
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.name in names and member.isfile():
                        data = tar.extractfile(member)
                        if data is not None:
                            found[(shard, member.name)] = data.read()
        except (OSError, tarfile.TarError):
            continue
    return found


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal (``0.5`` → ``"50.0%"``); None → ``"n/a"``."""
    return "n/a" if x is None else f"{100 * x:.1f}%"
