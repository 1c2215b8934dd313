"""G1 at the record stage: a run frozen (SIGSTOP) past its lease loses its rows
to a recovery and another run; resumed (SIGCONT), it writes nothing over the
rows another run took, sends nothing twice, and exits 1 saying it lost rows.
The answers of its two requests in flight settle their `incierto` rows (same
attempt: same claim token), as a replay from the outcome spool would."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from subprocess import Popen

import sqlalchemy as sa
from support import rows, run_worker, scalar, seed, start_worker, states, wait_until, worker_env

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer

LEASE = 2


def _open_transactions(url: str) -> int:
    """Transactions open on this test's database other than the probe's own
    (a frozen run must not hold a lock the recovery would wait on)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return 0
        except sqlite3.OperationalError:
            return 1
        finally:
            conn.close()
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                sql = (
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
                )
            else:
                sql = (
                    "SELECT COUNT(*) FROM information_schema.innodb_trx t "
                    "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                    "WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()"
                )
            return int(conn.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


def _freeze_outside_a_transaction(proc: Popen[str], url: str) -> None:
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        if _open_transactions(url) == 0:
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.03)
    raise AssertionError("could not freeze the run outside a transaction")


def test_a_run_frozen_past_its_lease_writes_nothing_over_recovered_rows(db_url: str, tmp_path: Path) -> None:
    server = SandboxServer(SandboxOptions(port=0, latency_ms=1500))
    server.start()
    try:
        ids = seed(db_url, 6)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        base = {"provider": "fake", "fake_base_url": server.base_url, "lease_seconds": LEASE}
        env_a = worker_env(db_url, tmp_path / "a", concurrency=2, **base)
        env_b = worker_env(db_url, tmp_path / "b", **base)  # another host: its own lock file
        frozen = start_worker(env_a, "run", log=tmp_path / "frozen.log")
        try:
            assert wait_until(lambda: states(db_url)["enviando"] == 2, timeout=20)
            _freeze_outside_a_transaction(frozen, db_url)
            table = rows(db_url)
            in_flight = {i for i, r in table.items() if r["estado"] == "enviando"}
            claimed = {i for i, r in table.items() if r["estado"] == "procesando"}
            assert len(in_flight) == 2 and len(claimed) == 4, table
            run_a = scalar(db_url, "SELECT MAX(id) FROM ejecuciones")
            # The two requests reached the provider before the freeze.
            assert wait_until(lambda: len(server.ledger()) == 2, timeout=10)
            time.sleep(LEASE + 0.5)

            # Past its lease: a recovery takes its rows, another run sends the claimed ones.
            recovered = run_worker(env_b, "recover")
            assert recovered.returncode == 0, recovered.stderr
            assert "dead runs 1: 4 row(s) back to pendiente, 2 to incierto" in recovered.stdout
            other = run_worker(env_b, "run")
            assert other.returncode == 0, other.stderr
            taken = rows(db_url)
            assert {taken[i]["estado"] for i in claimed} == {"enviado"}
            assert {taken[i]["estado"] for i in in_flight} == {"incierto"}

            frozen.send_signal(signal.SIGCONT)
            assert frozen.wait(timeout=60) == 1
        finally:
            frozen.send_signal(signal.SIGCONT)
            if frozen.poll() is None:
                frozen.kill()
                frozen.wait(timeout=10)
        # The resumed run wrote nothing over the rows the other run took; its
        # two accepted answers settled the rows of their own attempt.
        final = rows(db_url)
        assert {i: final[i] for i in claimed} == {i: taken[i] for i in claimed}
        assert {taken[i]["error_codigo"] for i in in_flight} == {"run_died"}
        assert {final[i]["estado"] for i in in_flight} == {"enviado"}
        assert all(final[i]["proveedor_msg_id"] and final[i]["error_codigo"] is None for i in in_flight)
        assert states(db_url) == Counter({"enviado": 6})
        assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == 6
        assert scalar(db_url, "SELECT estado FROM ejecuciones WHERE id = :r", r=run_a) == "muerta"
        # Nothing was sent twice: the provider saw each job exactly once.
        assert Counter(e["job_id"] for e in server.ledger()) == Counter({str(i): 1 for i in ids})
        log = (tmp_path / "frozen.log").read_text()
        assert "declared dead" in log
        assert "failed (exit 1): a recovery declared this run dead; it lost 4 row(s)" in log
        assert "claimed 6, sent 2" in log and "released 0, lost 4" in log, log
    finally:
        server.stop()
