"""SIGTERM / SIGINT become a stop flag instead of killing the process."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mm_llama.train.signals import StopOnSignal


def _wait_for(stop: StopOnSignal) -> None:
    deadline = time.monotonic() + 2.0
    while not stop.stop_requested and time.monotonic() < deadline:
        time.sleep(0.001)


def test_sigterm_sets_the_flag_and_does_not_kill() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(stop)
        assert stop.stop_requested and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # previous handler restored


def test_sigint_once_requests_a_stop_twice_interrupts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(stop)
            assert stop.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the second one raises here
    assert signal.getsignal(signal.SIGINT) == before


def test_a_second_sigterm_interrupts_a_stuck_run() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for(stop)
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. the loader never returns: the scheduler asks again
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGTERM) == before
