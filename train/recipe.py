"""Training recipes: YAML files mapped onto nested dataclasses, with `key.sub=value` overrides.

A recipe is a YAML mapping whose top-level keys are the sections of `RecipeConfig` (`model`, `data`,
`optim`, `schedule`, `train`, `checkpoint`, `logging`, `distributed`) plus `name` / `description`.
`inherit: base.yaml` (a path relative to the recipe, or a list of them) merges the base recipe(s)
first; mappings merge key by key, everything else (lists included) is replaced.

Validation is strict: unknown keys anywhere (in the file or in an override) are one error that names
all of them by dotted path together with the valid keys of their section, and wrong types name the
key, the value and the expected type; NaN and infinity (`.nan`, `.inf`) are refused wherever they occur,
naming the key. Numbers such as `1e-3` are floats (plain YAML 1.1 would read
them as strings). Relative paths in a recipe (shards, checkpoints) are kept as written and resolve
against the working directory of the run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from mm_llama.atomic_file import atomic_write
from mm_llama.train.recipe_sections import (
    DECODER_GROUP, FLOAT32_MAX, PARAM_KINDS, CheckpointConfig, DataConfig, DistributedConfig, LoggingConfig,
    ModelConfig, OptimConfig, RecipeConfig, RecipeError, ScheduleConfig, TrainConfig, non_finite_values,
)
from mm_llama.train.recipe_typing import _build_dataclass, _Issues

CONFIG_FILE = "config.yaml"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


# ------------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` / `3E5` (no dot) as floats, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML with the float rule above; errors name the source."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(f"{source} is not valid YAML: {err}") from err


def _read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of `path` with its `inherit` bases merged underneath."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"recipe inheritance loops: {cycle}; remove one of the `inherit` entries")
    if not path.is_file():
        via = f" (inherited by {chain[-1]})" if chain else ""
        raise RecipeError(f"recipe file {path} does not exist{via}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path} is not UTF-8 text ({err.reason} at byte {err.start}); a recipe is a YAML "
                          "file: check that the path names one") from err
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}; check the path and its permissions") from err
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections, got a {type(raw).__name__}")
    bases = raw.pop("inherit", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: `inherit` must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, _read_recipe_file(path.parent / base, (*chain, path)))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge recursively, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"optim.lr.fusion=3e-4"` → `(["optim", "lr", "fusion"], 0.0003)`.

    The value is read as YAML (`10` int, `1e-4` float, `true` bool, `[a, b]` list, `null`); a value that
    is not valid YAML is kept as a plain string, or, written as a list (`shards=[x/{0..9}.tar, y.tar]`,
    braces YAML cannot read), as the list of its items.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        raise RecipeError(f"override {text!r} is not of the form key.sub=value (e.g. train.steps=100)")
    if key == "inherit" or key.startswith("inherit."):
        raise RecipeError(f"override {text!r}: `inherit` can only be set inside a recipe file")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None  # noqa: S506
    except yaml.YAMLError:
        parsed = _bracketed_items(value.strip())
    return key.split("."), parsed


def _bracketed_items(value: str) -> str | list[str]:
    """`[x/{000..009}.tar, y.tar]`, which YAML cannot read (braces inside a flow list), → its items; a
    comma inside braces belongs to its pattern. Any other value stays the plain string."""
    if not (value.startswith("[") and value.endswith("]")):
        return value
    items, depth, current = [], 0, ""
    for char in value[1:-1]:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `raw[path[0]][path[1]]… = value`, creating mappings on the way."""
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise RecipeError(
                f"cannot set {'.'.join(path)}: {where} is {child!r}, not a mapping; set {where} itself "
                f"(e.g. {where}={{{path[depth + 1]}: {value!r}}})"
            )
        node = child
    node[path[-1]] = value


_RENAMED = {f"model.train_{part}": " (replaced by model.train, a list of the model's groups such as "
            "[image.encoder, image.fusion])" for part in ("encoder", "fusion", "decoder")}


def _flatten_group_maps(raw: dict[str, Any]) -> dict[str, Any]:
    """`optim.lr` / `optim.lr_multipliers` with nested mappings (`{image: {encoder: 0.1}}`, what a dotted
    override writes) flattened to the model's dotted group names (`{image.encoder: 0.1}`)."""
    optim = raw.get("optim")
    if not isinstance(optim, dict):
        return raw

    def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
        return out

    optim = {k: flat(v) if k in ("lr", "lr_multipliers") and isinstance(v, dict) else v for k, v in optim.items()}
    return {**raw, "optim": optim}


# ------------------------------------------------------------------------------------------ public API
def recipe_from_dict(raw: dict[str, Any], source: str = "recipe", overridden: Sequence[str] = ()) -> RecipeConfig:
    """Validate a raw (already merged) recipe mapping; `overridden` dotted keys are marked in errors."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must be a mapping of sections, got a {type(raw).__name__}")
    issues = _Issues()
    cfg = _build_dataclass(RecipeConfig, _flatten_group_maps(raw), "", issues)
    messages: list[str] = []
    if issues.unknown:
        lines = []
        for dotted, section, valid in issues.unknown:
            mark = " (from an override)" if any(dotted == o or dotted.startswith(o + ".") or o.startswith(dotted + ".")
                                               for o in overridden) else ""
            where = f"valid keys of {section}" if section else "valid top-level keys"
            lines.append(f"  {dotted}{mark}: {where}: {', '.join(valid)}" + _RENAMED.get(dotted, ""))
        names = ", ".join(d for d, _, _ in issues.unknown)
        messages.append(f"unknown key(s) {names}:\n" + "\n".join(lines) + "\n  fix the spelling or remove them")
    if issues.types:
        messages.append("wrong type(s):\n" + "\n".join(f"  {t}" for t in issues.types))
    if messages:
        raise RecipeError(f"{source}: " + "\n".join(messages))
    problems = cfg.problems()
    if problems:
        raise RecipeError(f"{source}: invalid settings:\n" + "\n".join(f"  {p}" for p in problems))
    return cfg


def resolve_recipe_path(name: str | Path) -> Path:
    """A recipe path as given, or a built-in recipe name (`vision_pretrain` → train/recipes/…yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = RECIPES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise RecipeError(f"recipe {str(name)!r} is neither a file nor a built-in recipe; built-in: {known or 'none'}")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Read a recipe (a path or built-in name), merge `inherit` bases and `key.sub=value` overrides, validate."""
    file = resolve_recipe_path(path)
    raw = _read_recipe_file(file)
    given: dict[str, str] = {}
    for text in overrides:
        key_path, value = parse_override(text)
        key = ".".join(key_path)
        if key in given:
            raise RecipeError(_twice(key, given[key], text, overrides))
        given[key] = text
        apply_override(raw, key_path, value)
    return recipe_from_dict(raw, str(file), list(given))


def _twice(key: str, first: str, again: str, overrides: Sequence[str]) -> str:
    """The error for a key given twice: the shell splits an unquoted brace pattern into one override per
    expansion, and keeping the last would silently train on one shard."""
    count = sum(parse_override(o)[0] == key.split(".") for o in overrides)
    message = f"{key} is set {count} times ({first!r}, {again!r}{', …' if count > 2 else ''}); give each key once"
    if "/" in first or "/" in again:  # paths: most likely a brace pattern the shell expanded
        message += (f". If the value holds a brace pattern, quote the whole override so the shell does not "
                    f"expand it: \"{key}=[shards/{{000000..000099}}.tar]\"")
    return message


def recipe_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """Plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RecipeConfig, run_dir: str | Path, filename: str = CONFIG_FILE) -> Path:
    """Write the final merged recipe to `run_dir/config.yaml` (loadable again with `load_recipe`)."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / filename
    return atomic_write(target, yaml.safe_dump(recipe_to_dict(cfg), sort_keys=False, allow_unicode=True))


__all__ = [
    "CONFIG_FILE", "DECODER_GROUP", "FLOAT32_MAX", "PARAM_KINDS", "RECIPES_DIR", "CheckpointConfig", "DataConfig",
    "DistributedConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "RecipeConfig", "RecipeError",
    "ScheduleConfig", "TrainConfig", "apply_override", "deep_merge", "load_recipe", "non_finite_values",
    "parse_override", "parse_yaml", "recipe_from_dict", "recipe_to_dict", "resolve_recipe_path", "save_config",
]
