"""Run metrics: `metrics.jsonl` (one JSON object per line, flushed each write), TensorBoard scalars,
throughput meters and a tqdm progress bar with loss, throughput and ETA."""

from __future__ import annotations

import json
import math
import numbers
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(value: Any) -> Any:
    """Python numbers from tensors / NumPy scalars; other JSON values unchanged."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric tensors must hold one value, got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)):
        return value.item() if hasattr(value, "item") else float(value)
    if isinstance(value, Mapping):
        return {str(k): _scalar(v) for k, v in value.items()}
    return value


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lr": {"encoder": 1e-4}}` → `{"lr/encoder": 1e-4}` (TensorBoard tags)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, tag + "/"))
        else:
            out[tag] = value
    return out


class MetricsLogger:
    """Appends `{"step": …, "time": …, **metrics}` lines to `run_dir/metrics.jsonl` and mirrors numeric
    values to TensorBoard (`run_dir/tensorboard/`, nested keys as `lr/encoder`).

    Typical keys: loss, lr (per group), grad_norm, tokens_per_s, samples_per_s, skipped_samples,
    nonfinite_steps; evaluation under `eval/…`. Non-finite numbers are written as JSON `NaN` /
    `Infinity` (Python's `json` reads them back). `resume_step`: lines past it (logged after the
    checkpoint a run resumes from) are dropped, and TensorBoard purges its events past it, so curves
    stay continuous. `enabled=False` (non-main ranks) makes every call a no-op.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._writer = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.run_dir) if int(r.get("step", 0)) <= resume_step]
            tmp = self.path.with_name(METRICS_FILE + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """Write one record (returned); `metrics` and keyword metrics are merged."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({str(k): _scalar(v) for k, v in {**(metrics or {}), **more}.items()})
        if not self.enabled or self._file is None:
            return record
        try:
            line = json.dumps(record)
        except TypeError as err:
            raise ValueError(f"metrics at step {step} must be JSON-serialisable: {err}") from err
        self._file.write(line + "\n")
        self._file.flush()
        if self._writer is not None:
            for tag, value in flatten({k: v for k, v in record.items() if k not in ("step", "time")}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(tag, value, int(step))
            self._writer.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of `run_dir/metrics.jsonl` (a torn last line from a killed run is skipped)."""
    return read_metrics_file(Path(run_dir) / METRICS_FILE)


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file (none if it does not exist; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break  # a write cut short by a kill
            raise ValueError(f"{path} line {i + 1} is not JSON: {err}") from err
    return records


class Throughput:
    """Samples/s and tokens/s since the last `rates()` call (the window between two log lines)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        self._tokens = 0

    def add(self, samples: int, tokens: int = 0) -> None:
        self._samples += int(samples)
        self._tokens += int(tokens)

    def rates(self) -> dict[str, float]:
        """`{"samples_per_s": …, "tokens_per_s": …}` over the window, then a new window starts."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        out = {"samples_per_s": self._samples / elapsed, "tokens_per_s": self._tokens / elapsed}
        self._start, self._samples, self._tokens = now, 0, 0
        return out


class RunClock:
    """Elapsed time of this training call and the time left, from the mean step time since it started
    (a resumed run counts from its resume)."""

    def __init__(self, start_step: int, total: int) -> None:
        self._start = time.perf_counter()
        self._start_step = start_step
        self._total = total

    def readings(self, step: int) -> dict[str, float]:
        """`{"elapsed_s": …, "eta_s": …}` at `step` (eta 0 at the last step)."""
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        eta = elapsed / done * (self._total - step) if done > 0 else float("nan")
        return {"elapsed_s": elapsed, "eta_s": max(eta, 0.0)}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (`peak_rss_mb`) and, on CUDA, the allocator's peak
    (`cuda_peak_mb`, since the process started or the last reset)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {"peak_rss_mb": rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def progress_line(step: int, total: int, record: dict[str, Any]) -> str:
    """One log line for runs without a progress bar: `step 40/300 loss 0.4366 …`."""
    def clock(seconds: float) -> str:
        if not math.isfinite(seconds):
            return "?"
        minutes, sec = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"

    loss = record.get("loss", float("nan"))
    parts = [f"step {step}/{total}", f"loss {loss:.4f}" if math.isfinite(loss) else f"loss {loss}"]
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts += [f"elapsed {clock(record['elapsed_s'])}", f"eta {clock(record['eta_s'])}",
              f"peak rss {record['peak_rss_mb']:,.0f} MB"]
    if "cuda_peak_mb" in record:
        parts.append(f"cuda peak {record['cuda_peak_mb']:,.0f} MB")
    return "  ".join(parts)


class ProgressBar:
    """tqdm over optimizer steps (ETA from tqdm) showing loss and throughput; a no-op when disabled."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)

    def update(self, n: int = 1, *, loss: float | None = None, tokens_per_s: float | None = None,
               samples_per_s: float | None = None) -> None:
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        if samples_per_s is not None:
            postfix["samples/s"] = f"{samples_per_s:.1f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, message: str) -> None:
        """Print above the bar without breaking it."""
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["METRICS_FILE", "MetricsLogger", "ProgressBar", "RunClock", "Throughput", "flatten", "peak_memory",
           "progress_line", "read_metrics"]
