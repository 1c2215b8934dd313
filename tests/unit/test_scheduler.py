"""The container's scheduler: a stop signal that lands while it is starting a
run (the handler runs in the same thread) never deadlocks it; the new run gets
the SIGTERM and the scheduler exits."""

from __future__ import annotations

import signal
import subprocess
import threading
from typing import Any

import pytest

from worker import scheduler


class FakeRun:
    """A run whose start is interrupted by the stop signal."""

    def __init__(self, sched: scheduler.Scheduler) -> None:
        self.pid = 4242
        self.signals: list[int] = []
        sched.forward(signal.SIGTERM)  # docker stop, while Popen is still running

    def poll(self) -> int | None:
        return -signal.SIGTERM if self.signals else None

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def wait(self) -> int:
        assert self.signals, "waited for a run that was never told to stop"
        return -signal.SIGTERM


def test_a_stop_signal_during_a_runs_start_forwards_and_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    sched = scheduler.Scheduler(60.0, [])
    started: list[FakeRun] = []

    def popen(*_args: Any, **_kwargs: Any) -> FakeRun:
        run = FakeRun(sched)
        started.append(run)
        return run

    monkeypatch.setattr(subprocess, "Popen", popen)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sched.loop()), daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the scheduler hung: the signal arrived while it started a run"
    assert result == [0]
    assert [run.signals for run in started] == [[signal.SIGTERM]]
