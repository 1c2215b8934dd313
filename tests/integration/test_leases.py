"""Heartbeats, leases on the database's clock, and transient-error retries."""

from __future__ import annotations

import datetime as dt
import time
import types
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import execute, run_worker, scalar, seed, start_worker, states, wait_until, worker_env

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
        recovered = repo.recover(lease_seconds=60)
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


def test_recover_command_and_run_agree_on_the_lease(db_url: str, tmp_path: Path) -> None:
    ids = seed(db_url, 1)
    engine = db.create_engine(db_url)
    try:
        repo = QueueRepository(engine)
        run_id = repo.register_run("h", 1, "run")
        repo.claim(run_id, "tok", 1)
    finally:
        engine.dispose()
    env = worker_env(db_url, tmp_path, lease_seconds=2)
    assert run_worker(env, "recover").returncode == 0
    assert states(db_url) == {"procesando": 1}
    time.sleep(2.3)
    proc = run_worker(env, "recover")
    assert proc.returncode == 0, proc.stderr
    assert "1 row(s) back to pendiente" in proc.stdout
    assert states(db_url) == {"pendiente": 1}
    assert execute(db_url, "UPDATE cola_envios SET estado = estado WHERE id = :i", i=ids[0]) == 1
