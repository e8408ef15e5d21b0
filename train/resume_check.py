"""What `--resume` may change: the recipe of a resumed run is compared with the one its checkpoint was
trained with, so that `config.yaml` never claims settings the run does not use.

A resumed run restores the optimizer (learning rates, betas, eps, weight decay per group) and the
schedule's base rates from the checkpoint, and the trained weights and data position only make sense
for the same model and data. So every difference is refused, except settings that change no trained
number and are applied as given (logged): how long to train (`train.steps`), logging, checkpointing,
evaluation, device and speed options, name and description.

The recorded recipe is the checkpoint's `extra["config"]` (written since this module exists), else the
run's `config.yaml` (which the run that wrote the checkpoint wrote at its start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm_llama.train.recipe import CONFIG_FILE, RecipeError, recipe_from_dict, recipe_to_dict

SAFE_TO_CHANGE = (
    "name", "description", "train.steps", "train.eval_every", "train.eval_batches", "train.eval_metric_samples",
    "train.max_nonfinite_in_a_row",
    "train.device", "train.compile", "train.activation_checkpointing", "data.eval_shards", "data.prefetch_factor",
    "checkpoint", "logging", "distributed.find_unused_parameters",
)
"""Dotted keys (or whole sections) a resumed run may change; everything else must match the checkpoint."""

_ABSENT = "<absent>"


@dataclass
class RecipeChanges:
    """`refused` / `applied`: `"key old → new"` lines; `unchecked`: why no comparison was possible ("" if it was)."""

    refused: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    unchecked: str = ""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-3}}` → `{"optim.lr": 1e-3}` (lists stay whole values; an empty mapping is a value)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    return value if value is _ABSENT else repr(value) if isinstance(value, str) else str(value)


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def _recorded_recipe(extra: dict[str, Any], run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The recipe the checkpoint was trained with, normalised (defaults filled in), and where it came from."""
    raw, source = extra.get("config"), "the checkpoint"
    if not isinstance(raw, dict):
        file = run_dir / CONFIG_FILE
        if not file.is_file():
            return None, str(file)
        try:
            raw, source = yaml.safe_load(file.read_text()), str(file)
        except (OSError, ValueError, yaml.YAMLError):
            return None, str(file)
    try:
        return recipe_to_dict(recipe_from_dict(raw, source)), source
    except RecipeError:  # written by a version with other keys: compare what is there
        return (raw, source) if isinstance(raw, dict) else (None, source)


def recipe_changes_on_resume(new: dict[str, Any], checkpoint: Any, run_dir: str | Path) -> RecipeChanges:
    """Compare `new` (`recipe_to_dict` of the resolved recipe) with the recipe `checkpoint` was trained with."""
    old, source = _recorded_recipe(getattr(checkpoint, "extra", {}) or {}, Path(run_dir))
    if old is None:
        return RecipeChanges(unchecked=f"--resume: cannot tell which recipe {checkpoint.path} was trained with "
                                       f"({source} is missing or unreadable); continuing with the recipe as given")
    before, after = flatten(old), flatten(new)
    changes = RecipeChanges()
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if a == b:
            continue
        line = f"{key} {_show(a)} → {_show(b)}"
        if key == "train.steps" and after.get("schedule.total_steps") is None \
                and after.get("schedule.kind") != "constant":
            line += " (the schedule now ends there: schedule.total_steps is null)"
        (changes.applied if _safe(key) else changes.refused).append(line)
    return changes


__all__ = ["RecipeChanges", "SAFE_TO_CHANGE", "flatten", "recipe_changes_on_resume"]
