"""Test-only crash points: kill this process at a chosen point of a run.

Off unless the environment variable ``COLA_TEST_CRASH_AT`` is set, which
nothing but the crash-point tests (tests/chaos/test_crash_matrix.py) does. It
is not a setting: no flag, not in ``--help``, not in ``Settings``. Its value is
``POINT`` or ``POINT:N``: the N-th time (default 1) this process reaches POINT,
it writes one line to stderr and kills itself with SIGKILL, as ``kill -9`` or
the OOM killer would: no ``finally``, no ``atexit``, no rollback sent, nothing
flushed.

The points of one message's life, in order:

=============  ===========================================================
after-claim    the claim transaction committed (rows are ``procesando``)
after-fence    the fence committed (``enviando``); the request not started
after-request  the request was written to the provider; its answer not read
after-answer   the answer was read and written to the outcome spool; its outcome not committed
after-record   the outcome committed
=============  ===========================================================

The variable is read once, at import (through :mod:`worker.settings`, the only
module that reads the environment); when it is unset every hook is one
comparison. A malformed value is a :class:`ConfigError` naming the variable.
Standard library only.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from worker.errors import ConfigError
from worker.settings import CRASH_HOOK_ENV, crash_hook_spec

AFTER_CLAIM = "after-claim"
AFTER_FENCE = "after-fence"
AFTER_REQUEST = "after-request"
AFTER_ANSWER = "after-answer"
AFTER_RECORD = "after-record"
POINTS = (AFTER_CLAIM, AFTER_FENCE, AFTER_REQUEST, AFTER_ANSWER, AFTER_RECORD)

# httpcore's trace event once the whole request has gone out (HTTP/1.1 and HTTP/2).
_REQUEST_WRITTEN_EVENT = ".send_request_body.complete"


def parse_spec(spec: str | None) -> tuple[str, int] | None:
    """``POINT[:N]`` as (point, n); None when unset."""
    if spec is None:
        return None
    point, sep, count = spec.strip().partition(":")
    if point not in POINTS:
        raise ConfigError(f"{CRASH_HOOK_ENV}: {point!r} is not one of {', '.join(POINTS)} (test-only hook)")
    n = 1
    if sep:
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"{CRASH_HOOK_ENV}: {count!r} after ':' must be a whole number of at least 1")
    return point, n


_target = parse_spec(crash_hook_spec())
_reached = 0
_lock = threading.Lock()


def armed(point: str) -> bool:
    return _target is not None and _target[0] == point


def crash_point(name: str, job: object = None) -> None:
    """Die here if ``COLA_TEST_CRASH_AT`` names this point and this is the
    N-th time it is reached; otherwise do nothing."""
    global _reached
    if _target is None or _target[0] != name:
        return
    with _lock:
        _reached += 1
        if _reached != _target[1]:
            return
        where = f", job {job}" if job is not None else ""
        line = f"cola-worker: test crash point {name} reached (time {_reached}{where}): SIGKILL\n"
        os.write(2, line.encode())
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # not reached: SIGKILL cannot be caught


def watch_request(extensions: dict[str, Any], job: object = None) -> None:
    """Crash point ``after-request`` for an ``httpx.Request``'s extensions:
    once armed, httpcore calls :func:`crash_point` right after the request's
    last byte was written to the socket, before the first byte of the answer
    is read."""
    if not armed(AFTER_REQUEST):
        return

    def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(_REQUEST_WRITTEN_EVENT):
            crash_point(AFTER_REQUEST, job)

    extensions["trace"] = trace
