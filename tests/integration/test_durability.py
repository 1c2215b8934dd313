"""Lost answers are not forgotten (issue 7, item 3): fence and record are
retried under the same claim token, and every provider answer goes to the
local outcome spool before its database write, so a run that could not record
it leaves it for the next run on the host instead of turning it `incierto`."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from support import rows, scalar, seed, states, worker_env

from worker import db
from worker.providers.registry import build_provider
from worker.queue import Attempt, QueueRepository
from worker.runner import Runner, RunResult
from worker.sandbox import SandboxServer
from worker.settings import load_settings
from worker.spool import OutcomeSpool, spool_path


def _lost_connection() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("COMMIT", {}, ConnectionResetError("Lost connection to server"))


class FlakyRepo(QueueRepository):
    """Fails chosen calls of fence/record: ``before`` raises without writing,
    ``after`` writes and commits, then raises (a COMMIT that looked failed)."""

    def __init__(
        self, engine: sa.Engine, fence_faults: Sequence[str] = (), record_faults: Sequence[str] = ()
    ) -> None:
        super().__init__(engine)
        self.fence_faults = list(fence_faults)
        self.record_faults = list(record_faults)
        self.fence_calls = 0
        self.record_calls = 0

    def fence(self, items: Sequence[tuple[int, str]]) -> tuple[set[int], set[int]]:
        self.fence_calls += 1
        fault = self.fence_faults.pop(0) if self.fence_faults else None
        if fault == "always":
            self.fence_faults.insert(0, "always")
        if fault in ("before", "always"):
            raise _lost_connection()
        result = super().fence(items)
        if fault == "after":
            raise _lost_connection()
        return result

    def record(
        self, run_id: int, provider: str, attempts: Sequence[Attempt], *, origen: str | None = None
    ) -> list[bool]:
        self.record_calls += 1
        fault = self.record_faults.pop(0) if self.record_faults else None
        if fault == "always":
            self.record_faults.insert(0, "always")
        if fault in ("before", "always"):
            raise _lost_connection()
        result = super().record(run_id, provider, attempts, origen=origen)
        if fault == "after":
            raise _lost_connection()
        return result


def _run(
    url: str, tmp_path: Path, sandbox: SandboxServer, repo: QueueRepository, **overrides: Any
) -> RunResult:
    options: dict[str, Any] = {"provider": "fake", "fake_base_url": sandbox.base_url, "concurrency": 1}
    options.update(overrides)
    settings = load_settings(environ=worker_env(url, tmp_path, **options))
    provider = build_provider(settings, max_connections=settings.concurrency)
    spool = OutcomeSpool(spool_path(settings.lock_file))
    try:
        runner = Runner(settings, repo, provider, "fake", spool=spool)
        return runner.execute()
    finally:
        spool.close()
        provider.close()


def _journal(url: str) -> list[dict[str, Any]]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(sa.text("SELECT * FROM intentos_envio ORDER BY cola_envio_id, id"))
            ]
    finally:
        engine.dispose()


def test_a_fence_whose_commit_looked_failed_is_sent_once(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    [row_id] = seed(db_url, 1)
    engine = db.create_engine(db_url)
    try:
        repo = FlakyRepo(engine, fence_faults=["after"])
        result = _run(db_url, tmp_path, sandbox, repo)
    finally:
        engine.dispose()
    assert repo.fence_calls >= 2  # the fence was tried again and saw the row already ours
    assert result.exit_code == 0
    assert rows(db_url)[row_id]["estado"] == "enviado"  # not `incierto` without a request
    assert [e["job_id"] for e in sandbox.ledger()] == [str(row_id)]


def test_a_fence_that_committed_but_never_confirmed_goes_back_to_pendiente_not_incierto(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    """The fence committed, every confirmation failed until the lease was
    about to run out: no request went out, and the next run knows it."""
    [row_id] = seed(db_url, 1)
    engine = db.create_engine(db_url)
    try:
        repo = FlakyRepo(engine, fence_faults=["after", "always"])
        result = _run(db_url, tmp_path, sandbox, repo, lease_seconds=2)
        assert result.exit_code == 1
        assert sandbox.ledger() == []
        assert rows(db_url)[row_id]["estado"] == "enviando"
        again = _run(db_url, tmp_path, sandbox, QueueRepository(engine))
        assert again.exit_code == 0
    finally:
        engine.dispose()
    row = rows(db_url)[row_id]
    assert (row["estado"], row["intentos"]) == ("enviado", 1)
    assert [e["job_id"] for e in sandbox.ledger()] == [str(row_id)]
    assert [j["origen"] for j in _journal(db_url)] == [None]  # one provider call, the second run's


def test_a_fence_that_failed_before_writing_is_retried(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    ids = seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        repo = FlakyRepo(engine, fence_faults=["before", "before"])
        result = _run(db_url, tmp_path, sandbox, repo)
    finally:
        engine.dispose()
    assert result.exit_code == 0
    assert states(db_url) == {"enviado": 2}
    assert sorted(e["job_id"] for e in sandbox.ledger()) == sorted(str(i) for i in ids)


def test_a_record_that_fails_is_retried_and_written_once(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    ids = seed(db_url, 3)
    engine = db.create_engine(db_url)
    try:
        repo = FlakyRepo(engine, record_faults=["before", "after", "before"])
        result = _run(db_url, tmp_path, sandbox, repo)
    finally:
        engine.dispose()
    assert result.exit_code == 0, result
    assert states(db_url) == {"enviado": 3}
    journal = _journal(db_url)
    assert Counter(j["cola_envio_id"] for j in journal) == Counter(ids)  # one journal row each
    assert all(j["origen"] is None for j in journal)
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == 3
    spool = Path(str(tmp_path / "locks" / "run.lock") + ".spool")
    assert spool.exists() and spool.stat().st_size == 0  # dropped once recorded


def test_an_answer_that_cannot_be_recorded_stops_the_run_and_the_next_run_replays_it(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    ids = seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        repo = FlakyRepo(engine, record_faults=["always"])
        t0 = time.monotonic()
        result = _run(db_url, tmp_path, sandbox, repo, lease_seconds=2, max_jobs=1)
        assert time.monotonic() - t0 < 30
        assert result.exit_code == 1
        assert result.counts.record_errors == 1
        [sent] = [int(e["job_id"]) for e in sandbox.ledger()]
        assert rows(db_url)[sent]["estado"] == "enviando"
        spool = OutcomeSpool(spool_path(str(tmp_path / "locks" / "run.lock")))
        try:
            [entry] = spool.pending()
        finally:
            spool.close()
        assert (entry.job_id, entry.outcome.resultado) == (sent, "accepted")

        # Another host's recovery makes the row `incierto` meanwhile (the run is finished).
        time.sleep(0.1)
        rec = QueueRepository(engine).recover()
        assert rec.uncertain == 1
        assert rows(db_url)[sent]["estado"] == "incierto"

        # The next run on this host replays the spool first.
        again = _run(db_url, tmp_path, sandbox, QueueRepository(engine), max_jobs=0)
        assert again.exit_code == 0
    finally:
        engine.dispose()
    table = rows(db_url)
    assert {i: table[i]["estado"] for i in ids} == {i: "enviado" for i in ids}
    assert table[sent]["proveedor_msg_id"]
    assert Counter(e["job_id"] for e in sandbox.ledger()) == Counter(str(i) for i in ids)  # nothing twice
    journal = [j for j in _journal(db_url) if j["cola_envio_id"] == sent]
    assert [(j["resultado"], j["origen"]) for j in journal] == [("accepted", "spool")]
    assert journal[0]["proveedor_msg_id"] == table[sent]["proveedor_msg_id"]
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp WHERE cola_envio_id = :i", i=sent) == 1
    assert Path(spool_path(str(tmp_path / "locks" / "run.lock"))).stat().st_size == 0


def test_replay_is_idempotent_and_leaves_rows_of_another_attempt_alone(db_url: str, tmp_path: Path) -> None:
    from worker.queue import Outcome
    from worker.spool import SpoolEntry

    a, b = seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        repo = QueueRepository(engine)
        run_id = repo.register_run("h", 1, "run", lease_seconds=60)
        repo.claim(run_id, "tok", 2)
        assert repo.fence([(a, "tok"), (b, "tok")]) == ({a, b}, set())
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        accepted = Outcome("enviado", "accepted", True, message_id="wamid.X", http_status=200)
        entries = [
            SpoolEntry(a, "tok", run_id, "fake", now, 12, 0, accepted),
            SpoolEntry(b, "tok", run_id, "fake", now, 12, 0, accepted),
        ]
        # Row b was settled by an operator meanwhile and requeued: another attempt.
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE cola_envios SET estado='pendiente', claim_token=NULL WHERE id=:i"), {"i": b}
            )
        first = repo.replay(entries)
        second = repo.replay(entries)
    finally:
        engine.dispose()
    assert (first.applied, first.stale, first.already) == (1, 1, 0)
    assert (second.applied, second.stale, second.already) == (0, 0, 2)
    table = rows(db_url)
    assert (table[a]["estado"], table[a]["proveedor_msg_id"]) == ("enviado", "wamid.X")
    assert table[b]["estado"] == "pendiente"
    journal = _journal(db_url)
    # The provider's answer for b is journaled (the audit sees it) but b is not touched.
    assert Counter((j["cola_envio_id"], j["origen"]) for j in journal) == {(a, "spool"): 1, (b, "spool"): 1}
