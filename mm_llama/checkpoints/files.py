"""Read checkpoint files (JSON configs, safetensors, torch `.pth`) so that a damaged file is one clear error.

Every failure becomes a `CheckpointError` whose message is one line: the file, what is wrong with it, and
what to do. The library's own exception is kept as `__cause__`.
"""

from __future__ import annotations

import json
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.config import show_value

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(error: BaseException, limit: int = 200) -> str:
    """A library error's message on one line (whitespace and terminal colours collapsed), shortened."""
    text = " ".join(_ANSI.sub("", str(error)).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path) -> Any:
    """Parsed JSON; invalid text is a CheckpointError naming the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; the file is damaged, "
            "fix or re-download it"
        ) from e
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); expected a JSON "
            "file, re-download it"
        ) from e


def read_json_object(path: Path) -> dict[str, Any]:
    """`read_json` for a file that must hold one JSON object (`config.json`, `params.json`, an index)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {show_value(data)}; expected a JSON object of named fields")
    return data


@contextmanager
def config_errors(path: Path) -> Iterator[None]:
    """Turn a ValueError raised while interpreting `path`'s fields into a CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {one_line(e, limit=400)}") from e


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(key, tensor)` from safetensors files, one tensor at a time (memory-mapped reads).

    A file that is empty, truncated or not safetensors at all raises a CheckpointError naming it; the
    check happens where the read does, so it also covers errors that surface while iterating.
    """
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    yield key, tensor
        except SafetensorError as e:
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({one_line(e)}); it is empty, truncated or "
                "damaged, re-download or re-save it"
            ) from e


def load_torch_file(file: Path) -> dict[str, torch.Tensor]:
    """A Meta `consolidated.NN.pth` as a dict of tensors (memory-mapped, `weights_only=True`).

    Truncated or garbage files, pickles that would run code and files that are not a flat dict of
    tensors all raise a CheckpointError naming the file.
    """
    try:
        data = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = one_line(e, limit=10_000)
        reason = reason.split("WeightsUnpickler error:", 1)[-1].split(". ", 1)[0].strip()[:160]
        raise CheckpointError(
            f"{file}: refused to load: it holds Python objects other than tensors, which would run code when "
            f"unpickled ({reason}); mm-llama reads weights only (torch.load weights_only=True), re-save the "
            "checkpoint as a dict of tensors"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        reason = one_line(e, limit=10_000).split(". ", 1)[0][:160]
        if "mmap can only be used" in reason:  # torch's wording for "not a zip archive"
            reason = "not in torch.save's zip format"
        raise CheckpointError(
            f"{file}: not a readable PyTorch checkpoint ({reason}); it is empty, truncated or damaged (or a "
            "legacy-format torch.save file), re-download or re-save it"
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a {type(data).__name__}; expected a dict of tensor name -> tensor")
    bad = [(k, v) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        key, value = bad[0]
        raise CheckpointError(
            f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor ({len(bad)} such entries); "
            "expected a flat dict of tensor name -> tensor"
        )
    return data
