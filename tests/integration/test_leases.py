"""Heartbeats, leases on the database's clock, and transient-error retries."""

from __future__ import annotations

import datetime as dt
import time
import types
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import (
    execute,
    kill_group,
    run_worker,
    scalar,
    seed,
    start_worker,
    states,
    wait_until,
    worker_env,
)

from worker import db
from worker import queue as queue_module
from worker.queue import QueueRepository
from worker.sandbox import SandboxOptions, SandboxServer


def test_a_run_heartbeats_several_times_per_lease(db_url: str, tmp_path: Path) -> None:
    server = SandboxServer(SandboxOptions(port=0, latency_ms=400))
    server.start()
    try:
        seed(db_url, 8)
        env = worker_env(
            db_url, tmp_path, provider="fake", fake_base_url=server.base_url, concurrency=1, lease_seconds=1
        )
        proc = start_worker(env, "run", log=tmp_path / "run.log")
        try:
            assert wait_until(lambda: scalar(db_url, "SELECT COUNT(*) FROM ejecuciones") == 1, timeout=20)
            beats = set()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                beats.add(scalar(db_url, "SELECT latido_at FROM ejecuciones"))
                time.sleep(0.05)
            # A 1 s lease: a beat at least every 1/3 s, so 2 s show at least 5 distinct values.
            assert len(beats) >= 5, beats
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        # The run outlived its 1 s lease many times over and was never declared dead.
        assert states(db_url)["enviado"] == 8
        assert scalar(db_url, "SELECT estado FROM ejecuciones") == "terminada"
    finally:
        server.stop()


class _AnyDatetime(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, dt.datetime)


class _ShiftedDatetime(dt.datetime, metaclass=_AnyDatetime):
    """This host's clock, two hours fast."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
        return dt.datetime.now(tz) + dt.timedelta(hours=2)


SHIFTED_CLOCK = types.SimpleNamespace(datetime=_ShiftedDatetime, timedelta=dt.timedelta, UTC=dt.UTC)


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_a_host_whose_clock_is_off_cannot_take_a_live_runs_rows(
    backend: str, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        repo = QueueRepository(engine)
        live = repo.register_run("other-host", 1, "run")
        claimed = repo.claim(live, "tok", 2)
        assert [r.id for r in claimed] == ids
        # This host's clock is two hours ahead: by it, the live run's heartbeat is stale.
        monkeypatch.setattr(db, "dt", SHIFTED_CLOCK)
        monkeypatch.setattr(queue_module, "dt", SHIFTED_CLOCK)
        assert db.dt.datetime.now() - dt.datetime.now() > dt.timedelta(hours=1)
        recovered = repo.recover()
        assert (recovered.runs, recovered.requeued, recovered.uncertain) == (0, 0, 0)
        assert states(db_url) == {"procesando": 2}
    finally:
        engine.dispose()


def test_a_lock_wait_timeout_reruns_the_whole_transaction(db_url: str, backend: str) -> None:
    """A real lock wait on the server: the first attempt times out, the retry succeeds."""
    [row_id] = seed(db_url, 1)
    engine = db.create_engine(db_url, pool_size=4)
    attempts = []
    try:
        holder = engine.connect()
        trans = holder.begin()
        if backend == "sqlite":  # the whole database is the lock
            holder.execute(sa.text("UPDATE cola_envios SET intentos = intentos WHERE id = :i"), {"i": row_id})
        else:
            holder.execute(sa.text("SELECT id FROM cola_envios WHERE id = :i FOR UPDATE"), {"i": row_id})

        def tx(conn: sa.Connection) -> int:
            attempts.append(time.monotonic())
            if len(attempts) == 2:  # the first try timed out: the lock goes now
                trans.rollback()
                holder.close()
            if backend == "mysql":
                conn.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 1"))
            elif backend == "postgresql":
                conn.execute(sa.text("SET LOCAL lock_timeout = '500ms'"))
            else:
                conn.exec_driver_sql("PRAGMA busy_timeout = 300")
            return int(
                conn.execute(
                    sa.text("UPDATE cola_envios SET intentos = intentos + 1 WHERE id = :i"), {"i": row_id}
                ).rowcount
            )

        try:
            assert db.transaction(engine, tx) == 1
        finally:
            if len(attempts) < 2:
                trans.rollback()
                holder.close()
        assert len(attempts) == 2, "the transient error was not retried"
        assert scalar(db_url, "SELECT intentos FROM cola_envios") == 1  # applied once
    finally:
        engine.dispose()


def test_recover_judges_a_run_by_its_own_lease(db_url: str, tmp_path: Path) -> None:
    ids = seed(db_url, 1)
    engine = db.create_engine(db_url)
    try:
        repo = QueueRepository(engine)
        run_id = repo.register_run("h", 1, "run", lease_seconds=3600)
        repo.claim(run_id, "tok", 1)
    finally:
        engine.dispose()
    env = worker_env(db_url, tmp_path, lease_seconds=1)
    time.sleep(1.2)  # silent for longer than the caller's lease, not its own
    proc = run_worker(env, "recover")
    assert proc.returncode == 0, proc.stderr
    assert "dead runs 0" in proc.stdout
    assert states(db_url) == {"procesando": 1}
    # Silent for longer than its own lease: recovered, whatever the caller's lease.
    execute(db_url, "UPDATE ejecuciones SET latido_at = :t", t=dt.datetime(2000, 1, 1))
    proc = run_worker(worker_env(db_url, tmp_path, lease_seconds=7200), "recover")
    assert proc.returncode == 0, proc.stderr
    assert "dead runs 1: 1 row(s) back to pendiente" in proc.stdout
    assert states(db_url) == {"pendiente": 1}
    assert execute(db_url, "UPDATE cola_envios SET estado = estado WHERE id = :i", i=ids[0]) == 1


def test_a_live_run_with_a_long_lease_is_not_recovered_by_a_short_lease(db_url: str, tmp_path: Path) -> None:
    """Issue 7 item 4: `cola-worker recover` with COLA_LEASE_SECONDS=1 does not
    declare a live run with a 30 s lease dead (its heartbeat is ~7 s apart)."""
    server = SandboxServer(SandboxOptions(port=0, latency_ms=6000))
    server.start()
    try:
        seed(db_url, 2)
        env = worker_env(
            db_url, tmp_path, provider="fake", fake_base_url=server.base_url, concurrency=2, lease_seconds=30
        )
        proc = start_worker(env, "run", log=tmp_path / "run.log")
        try:
            assert wait_until(lambda: states(db_url)["enviando"] == 2, timeout=30)
            time.sleep(1.2)  # older than the caller's lease, well within the run's own
            (tmp_path / "other").mkdir()
            short = worker_env(db_url, tmp_path / "other", lease_seconds=1)
            rec = run_worker(short, "recover")
            assert rec.returncode == 0, rec.stderr
            assert "dead runs 0" in rec.stdout, rec.stdout
            assert scalar(db_url, "SELECT lease_segundos FROM ejecuciones") == 30
            assert proc.wait(timeout=60) == 0, (tmp_path / "run.log").read_text()[-2000:]
        finally:
            kill_group(proc)
            proc.wait(timeout=30)
    finally:
        server.stop()
    assert states(db_url) == {"enviado": 2}
    assert scalar(db_url, "SELECT estado FROM ejecuciones") == "terminada"


def test_a_run_that_lost_rows_to_a_recovery_exits_non_zero_saying_so(db_url: str, tmp_path: Path) -> None:
    server = SandboxServer(SandboxOptions(port=0, latency_ms=5000))
    server.start()
    try:
        seed(db_url, 2)
        env = worker_env(
            db_url, tmp_path, provider="fake", fake_base_url=server.base_url, concurrency=2, lease_seconds=60
        )
        proc = start_worker(env, "run", log=tmp_path / "run.log")
        try:
            assert wait_until(lambda: states(db_url)["enviando"] == 2, timeout=30)
            # The run goes silent past its lease (as a stalled process would), and is
            # recovered (again if a heartbeat slipped in between, on a loaded machine).
            (tmp_path / "other").mkdir()
            for _ in range(3):
                execute(
                    db_url,
                    "UPDATE ejecuciones SET lease_segundos = 1, latido_at = :t",
                    t=dt.datetime(2000, 1, 1),
                )
                rec = run_worker(worker_env(db_url, tmp_path / "other"), "recover")
                if "dead runs 1" in rec.stdout:
                    break
            assert "dead runs 1" in rec.stdout, rec.stdout + rec.stderr
            code = proc.wait(timeout=60)
        finally:
            kill_group(proc)
            proc.wait(timeout=30)
    finally:
        server.stop()
    log = (tmp_path / "run.log").read_text()
    assert code == 1, log[-2000:]
    assert "a recovery declared this run dead" in log, log[-2000:]
    assert scalar(db_url, "SELECT estado FROM ejecuciones") == "muerta"
    # The answers came back after the recovery: they settle the rows of that attempt.
    assert states(db_url) == {"enviado": 2}
