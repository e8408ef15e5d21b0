"""Turn SIGTERM / SIGINT into a flag, so the training loop can checkpoint and exit cleanly.

    with StopOnSignal() as stop:
        for step in ...:
            train_step()
            if stop.stop_requested:       # in distributed runs: any_true(stop.stop_requested)
                save_checkpoint(...)
                break

A second signal while a stop is already pending raises `KeyboardInterrupt` (someone pressing Ctrl-C twice,
or a scheduler repeating SIGTERM, wants out now, even while a step or the data loader is stuck). The previous handlers are restored on exit. Signal handlers can only be
installed from the main thread; elsewhere the context manager raises.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Sequence


class StopOnSignal:
    """Context manager: `stop_requested` becomes True when one of `signals` arrives."""

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.stop_requested = False
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.stop_requested:
            raise KeyboardInterrupt(f"second {sig.name} while a stop was pending")
        self.stop_requested = True
        self.received = sig

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopOnSignal must be entered in the main thread (Python delivers signals only there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


__all__ = ["StopOnSignal"]
