"""Training checkpoints: trained weights + optimizer + scheduler + RNG + data position, written atomically.

Layout of one checkpoint, `RUN/ckpt-000100/`:

    trainable.safetensors   the trained tensors only (adapter weights; the frozen LM is never copied)
    optimizer.pt            optimizer.state_dict()          (torch.save, loaded with weights_only=True)
    scheduler.pt            scheduler.state_dict()
    rng.pt                  Python, NumPy, torch CPU (+ CUDA) generator states
    state.json              step, data position, extra (JSON)

It is written into `ckpt-000100.tmp/` (every file fsynced) and renamed to `ckpt-000100/` in one
`os.replace`, so a crash never leaves a half-written checkpoint under a final name; only then are the
checkpoints beyond the newest `keep_last` deleted. `latest_checkpoint` ignores and removes `.tmp`
leftovers. Only the main rank should save; in distributed runs `rng` may hold every rank's state
(`{"rank0": …, "rank1": …}`, gathered by the caller).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mm_llama.train.optim import unwrap

PREFIX = "ckpt-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(rf"{PREFIX}(\d+)")


class CheckpointingError(RuntimeError):
    """A training checkpoint that cannot be written or read."""


class NoIntactCheckpointError(CheckpointingError, ValueError):
    """A run has checkpoints, but none of them can be read (a ValueError: the CLI reports it in one line)."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns; dicts are ready for `load_state_dict` / `restore_rng`."""

    path: Path
    step: int
    trainable_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    data_position: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    """`ckpt-000100` for step 100 (more digits past 999999)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return f"{PREFIX}{step:06d}"


# ------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """This process' generator states: Python `random`, NumPy's global, torch CPU, and CUDA if in use."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` recorded (CUDA states only where CUDA is available)."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise CheckpointingError(f"RNG state lacks {missing}; it was not made by capture_rng (keys: {sorted(state)})")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------ model state
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable tensors under state-dict names (fusion layers keep their adapter names)."""
    inner = unwrap(model)
    trainable = {id(p) for p in inner.parameters() if p.requires_grad}
    return {k: v.detach() for k, v in inner.state_dict(keep_vars=True).items() if id(v) in trainable}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable tensors into `model` (same names as `trainable_state_dict`).

    Raises when a checkpoint key is unknown or a trainable tensor of the model is missing: a resume
    under different `model.train_*` flags than the run was started with.
    """
    inner = unwrap(model)
    expected = trainable_state_dict(inner)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise CheckpointingError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; resume with the recipe (model.train, architecture) the run started with"
        )
    with torch.no_grad():
        for name, target in expected.items():
            source = state[name]
            if source.shape != target.shape:
                raise CheckpointingError(f"{name}: checkpoint shape {tuple(source.shape)} != model shape {tuple(target.shape)}")
            target.copy_(source)


# ------------------------------------------------------------------------------------------ writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    trainable_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    data_position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write `run_dir/ckpt-<step>/` atomically and return it; then keep only the newest `keep_last`
    checkpoints (0 = keep all). `rng` defaults to `capture_rng()`; `data_position` and `extra` must be
    JSON-serialisable. Saving a step that already exists replaces it."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        state_json = json.dumps({"format": FORMAT_VERSION, "step": step, "data_position": data_position or {},
                                 "extra": extra or {}}, indent=1)
    except TypeError as err:
        raise CheckpointingError(f"data_position and extra must be JSON-serialisable (numbers, strings, lists, "
                                 f"dicts): {err}") from err
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trainable_state.items()}
    save_file(tensors, str(tmp / TRAINABLE_FILE), metadata={"format": "pt", "step": str(step)})
    _fsync(tmp / TRAINABLE_FILE)
    if optimizer is not None:
        _torch_save(_state_of(optimizer), tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        _torch_save(_state_of(scheduler), tmp / SCHEDULER_FILE)
    _torch_save(rng if rng is not None else capture_rng(), tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(state_json)
    _fsync(tmp / STATE_FILE)
    _fsync(tmp)

    old = final.with_name(final.name + ".old")
    if final.exists():  # re-saving a step: keep the previous copy until the new one is in place
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run)
    if old.exists():
        shutil.rmtree(old)
    if keep_last:
        for _, path in list_checkpoints(run)[:-keep_last]:
            if path != final:
                shutil.rmtree(path, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ reading
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as `(step, path)`, oldest first (no `.tmp` / `.old` entries)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = []
    for path in run.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path, *, clean: bool = True) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    With `clean`, leftovers of interrupted saves are tidied first: `ckpt-*.tmp/` is removed, and a
    `ckpt-*.old/` (a re-save interrupted between its two renames) is moved back if its final copy is
    missing, else removed. Call it on the main rank only (or before other ranks start saving).
    """
    run = Path(run_dir)
    if clean and run.is_dir():
        for path in run.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
        for path in run.glob(f"{PREFIX}*.old"):
            final = path.with_name(path.name.removesuffix(".old"))
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def _reason(err: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters (torch.load's messages run long)."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    first = first if len(first) <= limit else first[: limit - 1] + "…"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointingError(f"cannot read {path}: {_reason(err)}") from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory, or the newest checkpoint of a run directory. Every failure to read
    one of its files is a `CheckpointingError` naming the file and why."""
    directory = Path(path)
    if directory.is_dir() and not (directory / STATE_FILE).is_file():
        latest = latest_checkpoint(directory, clean=False)
        if latest is None:
            raise CheckpointingError(f"{directory} is neither a checkpoint nor a run directory with checkpoints "
                                     f"({PREFIX}NNNNNN/ holding {STATE_FILE})")
        directory = latest
    if not (directory / STATE_FILE).is_file():
        raise CheckpointingError(f"{directory} is not a checkpoint: {STATE_FILE} is missing")
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointingError(f"{directory / STATE_FILE} is corrupt: {type(err).__name__}: {err}") from err
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointingError(f"{directory} has checkpoint format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    if not (directory / TRAINABLE_FILE).is_file():
        raise CheckpointingError(f"{directory} lacks {TRAINABLE_FILE}")
    try:
        trainable = load_file(str(directory / TRAINABLE_FILE), device=str(map_location))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError; re-raised with the file named
        raise CheckpointingError(f"cannot read {directory / TRAINABLE_FILE}: {_reason(err)}") from err
    return Checkpoint(
        path=directory,
        step=step,
        trainable_state=trainable,
        optimizer=_torch_load(directory / OPTIMIZER_FILE, map_location),
        scheduler=_torch_load(directory / SCHEDULER_FILE, map_location),
        rng=_torch_load(directory / RNG_FILE, "cpu"),
        data_position=state.get("data_position", {}),
        extra=state.get("extra", {}),
    )


def load_resumable_checkpoint(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that reads completely (weights, optimizer and scheduler state), and
    the newer ones passed over as `(path, why)`, newest first; `(None, [])` when the run has none.

    Raises `NoIntactCheckpointError` (naming every checkpoint and why) when there are checkpoints but
    none of them can be read. Nothing is deleted or renamed.
    """
    corrupt: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointingError as err:
            corrupt.append((path, str(err)))
            continue
        lacking = [name for name, part in ((OPTIMIZER_FILE, ckpt.optimizer), (SCHEDULER_FILE, ckpt.scheduler))
                   if part is None]
        if lacking:
            corrupt.append((path, f"{path} lacks {' and '.join(lacking)}"))
            continue
        return ckpt, corrupt
    if corrupt:
        listed = "; ".join(why for _, why in corrupt)
        raise NoIntactCheckpointError(
            f"no checkpoint of {Path(run_dir)} can be resumed: {listed}. Start a new run with another --out, or "
            f"move these {PREFIX}* directories away to start this one over"
        )
    return None, []


def restore_training_state(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    rng: bool = True,
) -> None:
    """Resume: trained weights, optimizer and scheduler state, RNG (with `rng`), then
    `check_optimizer_params` — the optimizer must be built by `build_optimizer` for the same recipe."""
    from mm_llama.train.optim import check_optimizer_params

    load_trainable_state(model, checkpoint.trainable_state)
    if checkpoint.optimizer is None:
        raise CheckpointingError(f"{checkpoint.path} holds no optimizer state ({OPTIMIZER_FILE}); it cannot be resumed")
    saved = [(g.get("name"), len(g["params"])) for g in checkpoint.optimizer.get("param_groups", [])]
    built = [(g.get("name"), len(g["params"])) for g in optimizer.param_groups]
    if saved != built:
        raise CheckpointingError(f"{checkpoint.path} has optimizer param groups (name, size) {saved} but the "
                                 f"optimizer has {built}; resume with the recipe (model.train_*, optim.weight_decay_groups) the run started with")
    optimizer.load_state_dict(checkpoint.optimizer)
    if scheduler is not None:
        if checkpoint.scheduler is None:
            raise CheckpointingError(f"{checkpoint.path} holds no scheduler state ({SCHEDULER_FILE})")
        scheduler.load_state_dict(checkpoint.scheduler)
    if rng and checkpoint.rng is not None:
        restore_rng(checkpoint.rng)
    check_optimizer_params(optimizer, model)


__all__ = [
    "Checkpoint", "CheckpointingError", "NoIntactCheckpointError", "capture_rng", "load_resumable_checkpoint", "restore_training_state", "checkpoint_name", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_trainable_state", "restore_rng", "save_checkpoint", "trainable_state_dict",
]
