"""JSON from untrusted files (shard members ``KEY.json``, manifest lines) with limits that keep a bad
document from crashing or stalling a reader.

:func:`loads_limited` parses like ``json.loads`` and raises :class:`JSONLimitError` (a ``ValueError``)
with a short reason for anything a reader should skip rather than crash on: invalid JSON or UTF-8,
nesting deeper than :data:`MAX_JSON_DEPTH` (Python's parser raises ``RecursionError`` on deep nesting,
which is not a ``ValueError`` and escaped the readers' handlers), integers over Python's digit limit
(``ValueError`` from ``int()``), and strings holding lone surrogates (``"\\ud800"`` is valid JSON but
cannot be written back as UTF-8, so it would fail later, far from the line that caused it).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "JSONLimitError", "json_depth", "loads_limited"]

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted. Real metadata (captions, QA pairs, img2dataset /
video2dataset fields) is 1–3 levels deep; 64 leaves ample room while staying far below the depth
(about 1000) at which Python's parser raises RecursionError, and keeps every later recursive walk of
the object (copying, re-encoding) safe."""


class JSONLimitError(ValueError):
    """A JSON document was invalid or outside the limits; ``str(error)`` is the reason."""


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), computed without recursion.

    Stops counting at ``limit + 1``. Also raises `JSONLimitError` for a string (value or object key)
    that UTF-8 cannot encode (a lone surrogate).
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if isinstance(item, dict):
            children: list[Any] = list(item.values())
            for key in item:
                _check_text(key)
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raise JSONLimitError(
            f"a string holds a lone surrogate ({bad.encode('unicode_escape').decode()!s} at character {e.start}), "
            "which UTF-8 cannot store; fix the text (e.g. re-export the file as UTF-8)"
        ) from None


def loads_limited(data: bytes | bytearray | memoryview | str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(data)`` that raises `JSONLimitError` with a reason instead of crashing (module doc)."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONLimitError(f"not UTF-8 text ({e})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONLimitError(
            f"nested deeper than the limit of {limit} arrays/objects (MAX_JSON_DEPTH); flatten the metadata"
        ) from None
    except json.JSONDecodeError as e:
        raise JSONLimitError(f"invalid JSON ({e})") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        reason = str(e).split("; use sys.set_int_max_str_digits")[0]
        raise JSONLimitError(f"invalid JSON value ({reason}); store such long numbers as strings") from None
    depth = json_depth(value, limit)
    if depth > limit:
        raise JSONLimitError(
            f"nested deeper than the limit of {limit} arrays/objects (MAX_JSON_DEPTH); flatten the metadata"
        )
    return value
