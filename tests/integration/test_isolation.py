"""docs/design.md section 7: on MySQL/MariaDB the claim runs under READ COMMITTED
(under the default REPEATABLE READ, gap locks made producers wait and
claimers deadlock). Read from the server, inside the claim's own transaction."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from support import seed

from worker import db
from worker.queue import QueueRepository


def _claim_isolation(engine: sa.Engine) -> list[tuple[str, str]]:
    """Claim through the repository; right after its locking SELECT, on the same
    connection and in the same transaction, read the transaction's isolation
    level as InnoDB reports it and the session's setting."""
    seen: list[tuple[str, str]] = []

    def probe(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if "FOR UPDATE" not in statement:
            return
        own = cursor.connection.cursor()
        try:
            # INFORMATION_SCHEMA.INNODB_TRX is served from a cache that InnoDB
            # refreshes at most every 0.1 s: a transaction that began just now
            # may not be listed yet, so look again for a moment.
            trx = None
            for _ in range(20):
                own.execute(
                    "SELECT trx_isolation_level FROM information_schema.innodb_trx "
                    "WHERE trx_mysql_thread_id = CONNECTION_ID()"
                )
                trx = own.fetchone()
                if trx is not None:
                    break
                time.sleep(0.05)
            try:
                own.execute("SELECT @@session.transaction_isolation")
            except Exception:  # MariaDB before 11.1 names it tx_isolation
                own.execute("SELECT @@session.tx_isolation")
            session = own.fetchone()
        finally:
            own.close()
        seen.append((str(trx[0]) if trx is not None else "(not listed)", str(session[0])))

    sa.event.listen(engine, "after_cursor_execute", probe)
    try:
        repo = QueueRepository(engine)
        run_id = repo.register_run("h", 1, "run")
        claimed = repo.claim(run_id, f"tok{run_id}", 1)
        assert len(claimed) == 1
    finally:
        sa.event.remove(engine, "after_cursor_execute", probe)
    return seen


@pytest.mark.parametrize("backend", ["mysql"])
def test_the_claim_runs_under_read_committed_on_mysql(backend: str, db_url: str) -> None:
    seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        assert _claim_isolation(engine) == [("READ COMMITTED", "READ-COMMITTED")]
    finally:
        engine.dispose()
    # The control: an engine left at the server's default is seen as such, so the
    # probe above can fail.
    plain = sa.create_engine(db.parse_url(db_url), poolclass=sa.pool.NullPool)
    try:
        # (InnoDB may not list this transaction yet: the session's setting shows it.)
        [(_, session)] = _claim_isolation(plain)
        assert session == "REPEATABLE-READ"
    finally:
        plain.dispose()
