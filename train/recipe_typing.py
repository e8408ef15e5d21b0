"""Raw YAML values → the recipe's dataclasses, with every unknown key and wrong type collected (not just
the first) so that one error message can name them all."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

@dataclass
class _Issues:
    unknown: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (dotted key, section, valid keys)
    types: list[str] = field(default_factory=list)


class _Mismatch(Exception):
    pass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, path: str, issues: _Issues) -> Any:
    """`value` as type `tp`; raises `_Mismatch` for a wrong type (nested unknown keys go to `issues`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial = _Issues()
            try:
                out = _convert(value, arg, path, trial)
            except _Mismatch:
                continue
            issues.unknown += trial.unknown
            issues.types += trial.types
            return out
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section (`model:` with nothing under it)
            value = {}
        if not isinstance(value, dict):
            raise _Mismatch
        return _build_dataclass(tp, value, path, issues)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single item is a one-element list
        return [_convert_field(v, item, f"{path}[{i}]", issues) for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, a, path, issues) for v, a in zip(value, args))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Mismatch
        return {str(k): _convert_field(v, val_tp, f"{path}.{k}", issues) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"recipe field {path} has an unsupported annotation {tp!r}")  # a bug in this module


def _convert_field(value: Any, tp: Any, path: str, issues: _Issues) -> Any:
    """Like `_convert`, but a wrong type is recorded (naming key, value and expected type), not raised."""
    try:
        return _convert(value, tp, path, issues)
    except _Mismatch:
        issues.types.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return _DEFAULT


_DEFAULT = object()  # marks a field that failed conversion (its default is used until the error is raised)


def _build_dataclass(cls: type, raw: dict[str, Any], path: str, issues: _Issues) -> Any:
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in valid:
            issues.unknown.append((dotted, path, valid))
            continue
        converted = _convert_field(value, hints[key], dotted, issues)
        if converted is not _DEFAULT:
            kwargs[key] = converted
    return cls(**kwargs)
