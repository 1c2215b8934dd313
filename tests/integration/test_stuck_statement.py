"""A stuck statement never stops the queue (MariaDB and PostgreSQL).

Another session (an operator's open `psql` or `mysql`) holds one row's lock in
an open transaction while a run needs to write that row. The run's sessions
carry a lock wait limit and a statement time limit (`COLA_DB_LOCK_TIMEOUT`,
`COLA_DB_STATEMENT_TIMEOUT`), so the write gives up instead of waiting for
ever (PostgreSQL's default) or for minutes (MariaDB's 50 s per try, eight
tries): the other rows are sent and recorded within seconds, the run ends
while the lock is still held, and the held row is handled once the lock goes.

The test holds the lock for 30 s rather than a minute: the limits are 1 s
(lock) and 5 s (statement) here, so 30 s is already many times what the run
needs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import phone, rows, run_worker, seed, start_worker, wait_until, worker_env

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer

HOLD_SECONDS = 30.0
SERVER_BACKENDS = ("mysql", "postgresql")


@contextmanager
def row_lock(url: str, row_id: int) -> Iterator[str]:
    """Another session: an open transaction holding ``row_id``'s lock (as an
    operator's `SELECT ... FOR UPDATE` would). Yields the row's state then."""
    engine = db.create_engine(url)  # no session limits: it waits as long as it must
    try:
        with engine.connect() as conn:
            tx = conn.begin()
            try:
                estado = conn.execute(
                    sa.text("SELECT estado FROM cola_envios WHERE id = :i FOR UPDATE"), {"i": row_id}
                ).scalar_one()
                yield str(estado)
            finally:
                tx.rollback()
    finally:
        engine.dispose()


def _estado(url: str, row_id: int) -> str:
    return str(rows(url)[row_id]["estado"])


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
@pytest.mark.parametrize("phase", ["record", "fence"])
def test_a_row_locked_by_another_session_does_not_stop_the_queue(
    db_url: str, tmp_path: Path, phase: str
) -> None:
    """``record``: the row is locked while its request is on the wire, so the
    write of its answer waits. ``fence``: the row is locked after the claim,
    before it moves to `enviando` (it waits for its recipient's pair slot)."""
    if phase == "record":
        ids = seed(db_url, 6)
        held = ids[0]
        options = SandboxOptions(port=0, latency_ms=1500)
        pair_interval = 0.0
        lock_when = "enviando"
    else:
        # Rows 0 and 5 share a recipient: row 5 waits for the pair interval.
        ids = seed(db_url, 6, recipients=[phone(k) for k in range(5)])
        held = ids[5]
        options = SandboxOptions(port=0, latency_ms=200)
        pair_interval = 4.0
        lock_when = "procesando"
    others = [i for i in ids if i != held]
    server = SandboxServer(options)
    server.start()
    try:
        env = worker_env(
            db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            concurrency=6,
            pair_interval=pair_interval,
            lease_seconds=10,
            db_lock_timeout=1,
            db_statement_timeout=5,
        )
        proc = start_worker(env, "run", log=tmp_path / "run.log")
        try:
            assert wait_until(lambda: _estado(db_url, held) == lock_when, timeout=30), rows(db_url)[held]
            with row_lock(db_url, held) as estado_then:
                locked_at = time.monotonic()
                assert estado_then == lock_when  # the run had not written it yet
                # The other rows are sent and recorded within seconds.
                assert wait_until(
                    lambda: all(rows(db_url)[i]["estado"] == "enviado" for i in others), timeout=20
                ), (rows(db_url), (tmp_path / "run.log").read_text())
                # The run does not wait for the lock: it ends while the lock is still held.
                left = HOLD_SECONDS - (time.monotonic() - locked_at)
                code = proc.wait(timeout=max(1.0, left))
                assert time.monotonic() - locked_at < HOLD_SECONDS
                log = (tmp_path / "run.log").read_text()
                assert code in (0, 1), log  # 1: the held row's outcome could not be written
                # The held row was not given up as sent or failed while locked.
                assert _estado(db_url, held) in ("procesando", "enviando", "enviado"), log
                time.sleep(max(0.0, HOLD_SECONDS - (time.monotonic() - locked_at)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        # The lock went: the next run handles the held row, and nothing went out twice.
        again = run_worker(env, "run")
        assert again.returncode == 0, again.stderr
        table = rows(db_url)
        assert all(table[i]["estado"] == "enviado" for i in others)
        sent = Counter(entry["job_id"] for entry in server.ledger())
        assert all(sent[str(i)] == 1 for i in others), sent
        if phase == "fence":
            # Never fenced, so never sent: it goes out now, once.
            assert table[held]["estado"] == "enviado", again.stderr
            assert sent[str(held)] == 1
        else:
            # Accepted by the provider, its answer unwritten when the run ended:
            # enviado when the answer could be replayed, else incierto for an
            # operator; never pendiente (that would send it again).
            assert table[held]["estado"] in ("enviado", "incierto"), again.stderr
            assert sent[str(held)] == 1
    finally:
        server.stop()


def _heartbeat_age(url: str) -> float:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            now = db.db_now(conn)
            beat = conn.execute(sa.text("SELECT MAX(latido_at) FROM ejecuciones")).scalar_one()
            return (now - beat).total_seconds()
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_a_run_whose_writes_are_stuck_stops_renewing_its_lease(db_url: str, tmp_path: Path) -> None:
    """With the session limits off, the write of an answer waits for the lock
    as long as it is held. The process is alive, but the heartbeat reflects
    progress: it is withheld, so the run's lease runs out and a recovery may
    take its rows. Once the lock goes the writes succeed and the run ends."""
    ids = seed(db_url, 3)
    held = ids[0]
    server = SandboxServer(SandboxOptions(port=0, latency_ms=1000))
    server.start()
    try:
        lease = 3.0
        env = worker_env(
            db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            concurrency=3,
            lease_seconds=lease,
            db_lock_timeout=0,
            db_statement_timeout=0,
        )
        proc = start_worker(env, "run", log=tmp_path / "run.log")
        try:
            assert wait_until(lambda: _estado(db_url, held) == "enviando", timeout=30)
            with row_lock(db_url, held) as estado_then:
                assert estado_then == "enviando"
                assert wait_until(lambda: _heartbeat_age(db_url) > lease, timeout=20), (
                    tmp_path / "run.log"
                ).read_text()
                assert proc.poll() is None  # alive, yet no longer renewing its lease
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        log = (tmp_path / "run.log").read_text()
        assert code == 0, log
        assert "heartbeat withheld" in log
        assert {rows(db_url)[i]["estado"] for i in ids} == {"enviado"}
    finally:
        server.stop()
