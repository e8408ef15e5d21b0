"""How the per-input commands (`caption`, `vqa`, `transcribe`, `translate`) print their results: one
line (or JSON object) per input, a skipped input named on stderr, exit status 1 when any was skipped."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Result(Protocol):
    source: str
    text: str | None
    error: str | None


def print_results(command: str, results: Sequence[Result], *, as_json: bool, source_key: str, noun: str,
                  fields: Callable[[Any], dict[str, Any]], extra: dict[str, Any] | None = None) -> int:
    """Print `results` (JSON objects `{source_key: …, **fields(r), **extra}` with `as_json`, else the text,
    prefixed by the source when there are several); returns the exit status (1 if any input failed)."""
    failed = 0
    for r in results:
        if r.error is not None:
            failed += 1
            print(f"mm-llama {command}: skipped {r.source}: {r.error}", file=sys.stderr)
            if as_json:
                print(json.dumps({source_key: r.source, "error": r.error, **(extra or {})}))
        elif as_json:
            print(json.dumps({source_key: r.source, **fields(r), **(extra or {})}))
        else:
            print(f"{r.source}: {r.text}" if len(results) > 1 else r.text)
    if failed:
        print(f"mm-llama {command}: {failed} of {len(results)} {noun}(s) could not be read", file=sys.stderr)
    return 1 if failed else 0
