"""The heartbeat reflects progress: WriteWatch measures how long the run's
awaited database writes have gone without one succeeding; the session limits
and the bounded retry of timeouts (worker/db.py)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import exc as sa_exc

from worker import db
from worker.errors import ColaError
from worker.runner import GroupCommit, WriteWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_awaited_is_never_stalled() -> None:
    clock = Clock()
    watch = WriteWatch(clock)
    clock.now += 1000
    assert watch.stalled_for() == 0.0


def test_a_write_that_does_not_return_stalls_and_a_success_ends_it() -> None:
    clock = Clock()
    watch = WriteWatch(clock)
    with watch.waiting():
        clock.now += 7
        assert watch.stalled_for() == 7
        with watch.waiting():  # another writer succeeds meanwhile: progress
            clock.now += 1
        assert watch.stalled_for() == 0
        clock.now += 3
        assert watch.stalled_for() == 3
    assert watch.stalled_for() == 0


def test_a_failed_write_tried_again_is_not_progress() -> None:
    clock = Clock()
    watch = WriteWatch(clock)
    for _ in range(3):
        with pytest.raises(TimeoutError), watch.waiting():
            clock.now += 10
            raise TimeoutError("lock wait timeout")
    with watch.waiting():
        assert watch.stalled_for() == 30  # still counted from the first try
    with watch.waiting():
        assert watch.stalled_for() == 0  # the success above reset it


def test_group_commit_reports_its_waiting_callers() -> None:
    gate = threading.Event()
    watch = WriteWatch()

    def write(items: list[int]) -> list[int]:
        gate.wait(10)
        return items

    gc: GroupCommit[int, int] = GroupCommit("t", write, watch=watch)
    try:
        caller = threading.Thread(target=gc, args=(1,))
        caller.start()
        for _ in range(200):
            if watch.waiting_count():
                break
            threading.Event().wait(0.01)
        assert watch.waiting_count() == 1
        gate.set()
        caller.join(10)
        assert watch.waiting_count() == 0
    finally:
        gate.set()
        gc.close()


# --- worker/db.py: session limits and bounded retries ---------------------------------


def test_session_limit_statements_per_server() -> None:
    assert db.session_limit_statements("postgresql", "", 5, 30) == [
        "SET lock_timeout = 5000",
        "SET statement_timeout = 30000",
    ]
    assert db.session_limit_statements("mysql", "10.11.6-MariaDB-0+deb12u1", 2.5, 30) == [
        "SET SESSION innodb_lock_wait_timeout = 3",
        "SET SESSION max_statement_time = 30.000",
    ]
    assert db.session_limit_statements("mysql", "8.4.2", 1, 0.5) == [
        "SET SESSION innodb_lock_wait_timeout = 1",
        "SET SESSION max_execution_time = 500",
    ]
    assert db.session_limit_statements("postgresql", "", 0, 0) == []  # 0: the server's default


class _DriverError(Exception):
    def __init__(self, errno: int | None = None, sqlstate: str | None = None) -> None:
        super().__init__(errno, "driver error")
        self.sqlstate = sqlstate


def _wrapped(errno: int | None = None, sqlstate: str | None = None) -> sa_exc.OperationalError:
    return sa_exc.OperationalError("UPDATE ...", {}, _DriverError(errno, sqlstate))


@pytest.mark.parametrize(
    ("error", "transient", "timeout"),
    [
        (_wrapped(1213), True, False),  # deadlock
        (_wrapped(1205), True, True),  # lock wait timeout
        (_wrapped(1969), True, True),  # MariaDB max_statement_time
        (_wrapped(3024), True, True),  # MySQL max_execution_time
        (_wrapped(sqlstate="55P03"), True, True),  # lock_timeout
        (_wrapped(sqlstate="57014"), True, True),  # statement_timeout
        (_wrapped(sqlstate="40P01"), True, False),  # deadlock
        (_wrapped(1062), False, False),
    ],
)
def test_timeouts_are_transient(error: sa_exc.OperationalError, transient: bool, timeout: bool) -> None:
    assert db.is_transient(error) is transient
    assert db.is_timeout(error) is timeout


class _Engine:
    """Enough of an Engine for db.transaction: begin() as a context manager."""

    def begin(self) -> _Engine:
        return self

    def __enter__(self) -> object:
        return object()

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(("errno", "tries"), [(1213, 8), (1205, db.TIMEOUT_TRIES)])
def test_a_timeout_is_tried_again_once_a_deadlock_up_to_the_bound(errno: int, tries: int) -> None:
    calls = 0

    def fn(_conn: object) -> None:
        nonlocal calls
        calls += 1
        raise _wrapped(errno)

    with pytest.raises(sa_exc.OperationalError):
        db.transaction(_Engine(), fn)  # type: ignore[arg-type]
    assert calls == tries


@pytest.mark.parametrize("error", [_wrapped(1205), _wrapped(1969), _wrapped(sqlstate="57014")])
def test_a_timeout_that_reaches_the_user_says_what_to_do(error: sa_exc.OperationalError) -> None:
    translated = db.translate_error(error)
    assert isinstance(translated, ColaError) and translated.exit_code == 1
    assert "COLA_DB_LOCK_TIMEOUT" in str(translated) and "driver error" in str(translated)


def test_the_pause_between_failed_tries_is_still_a_stall() -> None:
    # A write failed and its retry is sleeping in its backoff: nothing is awaited
    # right now, but nothing has succeeded either, so the heartbeat stays withheld.
    clock = Clock()
    watch = WriteWatch(clock)
    with pytest.raises(TimeoutError), watch.waiting():
        clock.now += 5
        raise TimeoutError("lock wait timeout")
    clock.now += 2
    assert watch.stalled_for() == 7
