"""The incident, reproduced: many runs at once over one queue, on MariaDB and
PostgreSQL. Every message must be accepted exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from support import rows, run_worker, scalar, seed, start_worker, states, worker_env

from worker import db
from worker.queue import QueueRepository
from worker.sandbox import SandboxOptions, SandboxServer

N_MESSAGES = 2000
N_RUNS = 8


@pytest.fixture(params=["mysql", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:  # overrides conftest: servers only
    return str(request.param)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    server = SandboxServer(SandboxOptions(port=0, latency_ms=5))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_eight_concurrent_runs_send_2000_messages_exactly_once(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    ids = seed(db_url, N_MESSAGES)
    procs = []
    for k in range(N_RUNS):
        env = worker_env(
            db_url,
            tmp_path,
            provider="fake",
            fake_base_url=sandbox.base_url,
            lock_file=tmp_path / "locks" / f"host{k}.lock",  # separate hosts: SKIP LOCKED must do the work
            max_jobs=0,
            batch_size=20,
            concurrency=8,
        )
        procs.append(start_worker(env, "run", log=tmp_path / f"run{k}.log"))
    codes = [p.wait(timeout=300) for p in procs]
    logs = "\n".join((tmp_path / f"run{k}.log").read_text() for k in range(N_RUNS))
    assert codes == [0] * N_RUNS, logs[-3000:]

    ledger = Counter(entry["job_id"] for entry in sandbox.ledger())
    assert ledger == Counter({str(i): 1 for i in ids}), "a message was lost or sent twice"
    assert sandbox.stats()["duplicates"] == {}
    assert states(db_url) == Counter({"enviado": N_MESSAGES})
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == N_MESSAGES
    # The work was really shared: several runs claimed rows.
    owners = Counter(r["ejecucion_id"] for r in rows(db_url).values())
    assert len(owners) >= 4, owners
    audit = run_worker(worker_env(db_url, tmp_path), "audit", "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_claimers_get_disjoint_rows_while_a_claim_is_open(db_url: str) -> None:
    """Two real connections: while the first claim transaction holds its rows,
    a second claimer skips them instead of waiting or taking them."""
    seed(db_url, 10)
    engine = db.create_engine(db_url, pool_size=4)
    repo = QueueRepository(engine)
    try:
        with engine.connect() as first:
            trans = first.begin()
            now = db.db_now(first)
            held = [int(r[0]) for r in first.execute(repo.claim_statement(now, 4))]
            assert len(held) == 4
            run_id = repo.register_run("h", 1, "run")
            got = repo.claim(run_id, "t2", 10)  # another connection, while the first holds its locks
            assert {r.id for r in got}.isdisjoint(held)
            assert len(got) == 6
            trans.rollback()
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["mysql"])  # the filesort trap is InnoDB's
def test_claim_walks_the_claim_index_without_filesort(backend: str, db_url: str) -> None:
    seed(db_url, 200)
    engine = db.create_engine(db_url)
    repo = QueueRepository(engine)
    try:
        with engine.connect() as conn:
            now = db.db_now(conn)
            stmt = repo.claim_statement(now, 50)
            sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            conn.execute(sa.text("ANALYZE TABLE cola_envios"))
            plan = [dict(r._mapping) for r in conn.execute(sa.text("EXPLAIN " + sql))]
    finally:
        engine.dispose()
    assert len(plan) == 1, plan
    assert plan[0]["key"] == "ix_cola_envios_claim", plan
    assert "filesort" not in str(plan[0].get("Extra") or "").lower(), plan
