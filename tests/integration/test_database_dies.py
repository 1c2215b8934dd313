"""The database dies in the middle of a run (G2, G3). Per docs/design.md section 8
the test kills only a private MariaDB server of its own, by pid."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import _skip_or_fail
from support import (
    PrivateMariaDB,
    ServerUnavailable,
    run_worker,
    seed,
    start_worker,
    states,
    wait_until,
    worker_env,
)

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer


@pytest.fixture
def private_mariadb() -> Iterator[PrivateMariaDB]:
    try:
        server = PrivateMariaDB()
    except ServerUnavailable as exc:
        _skip_or_fail(str(exc))
        raise
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_database_killed_mid_run_nothing_sent_twice_nothing_lost(
    private_mariadb: PrivateMariaDB, tmp_path: Path
) -> None:
    url = private_mariadb.url
    engine = db.create_engine(url)
    db.upgrade(engine)
    engine.dispose()
    ids = seed(url, 30)
    sandbox = SandboxServer(SandboxOptions(port=0, latency_ms=300))
    sandbox.start()
    try:
        env = worker_env(
            url, tmp_path, provider="fake", fake_base_url=sandbox.base_url, concurrency=4, lease_seconds=2
        )
        run = start_worker(env, "run", "--batch-size", "10", log=tmp_path / "run.log")
        assert wait_until(lambda: states(url)["enviado"] >= 4, timeout=30)
        private_mariadb.kill()
        code = run.wait(timeout=60)
        log = (tmp_path / "run.log").read_text()
        assert code == 3, log[-2000:]  # database unreachable
        assert "unreachable" in log

        private_mariadb.start()  # same data directory: InnoDB crash recovery
        time.sleep(2.5)  # the dead run's lease runs out
        again = run_worker(env, "run", "--max-jobs", "0")
        assert again.returncode == 0, again.stderr
        assert "recovered 1 dead run(s)" in again.stderr
    finally:
        sandbox.stop()
    final = states(url)
    assert final["pendiente"] == final["procesando"] == final["enviando"] == 0, final
    assert final["enviado"] + final["incierto"] == 30
    ledger = Counter(e["job_id"] for e in sandbox.ledger())
    assert max(ledger.values()) == 1, "a message was sent twice"
    table_sent = {str(i) for i, r in _rows(url).items() if r == "enviado"}
    assert table_sent <= set(ledger)  # every row marked sent really was accepted
    assert set(ledger) <= {str(i) for i in ids}


def _rows(url: str) -> dict[int, str]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return {int(r[0]): r[1] for r in conn.execute(sa.text("SELECT id, estado FROM cola_envios"))}
    finally:
        engine.dispose()


def test_answers_in_flight_when_the_database_dies_are_replayed_not_incierto(
    private_mariadb: PrivateMariaDB, tmp_path: Path
) -> None:
    """Issue 7 item 3: the database dies while requests are in flight; their
    answers cannot be recorded. They are in the outcome spool, and the next
    run on the host (once the database is back) records them: the accepted
    rows end `enviado`, not `incierto`, and nothing is sent twice."""
    url = private_mariadb.url
    engine = db.create_engine(url)
    db.upgrade(engine)
    engine.dispose()
    ids = seed(url, 12)
    sandbox = SandboxServer(SandboxOptions(port=0, latency_ms=1500))
    sandbox.start()
    try:
        env = worker_env(
            url, tmp_path, provider="fake", fake_base_url=sandbox.base_url, concurrency=6, lease_seconds=3
        )
        run = start_worker(env, "run", "--max-jobs", "6", log=tmp_path / "run.log")
        # Six requests in flight (the sandbox holds each answer 1.5 s): kill the database.
        assert wait_until(lambda: states(url)["enviando"] == 6, timeout=30)
        private_mariadb.kill()
        code = run.wait(timeout=60)
        log = (tmp_path / "run.log").read_text()
        assert code != 0, log[-2000:]
        assert "outcome spool" in log, log[-3000:]
        in_flight = Counter(e["job_id"] for e in sandbox.ledger())
        assert len(in_flight) == 6

        private_mariadb.start()  # same data directory: InnoDB crash recovery
        assert states(url) == {"enviando": 6, "pendiente": 6}  # nothing of the answers reached it
        time.sleep(3.5)  # the dead run's lease runs out
        again = run_worker(env, "run", "--max-jobs", "0")
        assert again.returncode == 0, again.stderr
        assert "replayed 6" in again.stderr, again.stderr[-3000:]
    finally:
        sandbox.stop()
    final = _rows(url)
    assert Counter(final.values()) == {"enviado": 12}, final
    ledger = Counter(e["job_id"] for e in sandbox.ledger())
    assert ledger == Counter(str(i) for i in ids), "a message was sent twice or not at all"
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            origins = Counter(
                (str(r[0]), r[1])
                for r in conn.execute(sa.text("SELECT cola_envio_id, origen FROM intentos_envio"))
            )
            ledger_rows = conn.execute(sa.text("SELECT COUNT(*) FROM envios_whatsapp")).scalar_one()
    finally:
        engine.dispose()
    assert {job for (job, origen) in origins if origen == "spool"} == set(in_flight)
    assert max(origins.values()) == 1  # one journal row per provider call
    assert ledger_rows == 12
