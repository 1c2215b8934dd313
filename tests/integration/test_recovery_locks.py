"""Recovery never waits on a locked row (issue 7, item 5): it takes the rows
it can lock (SKIP LOCKED) and leaves a row another session holds to a later
recovery, so one open transaction cannot stall the start of every run."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
import sqlalchemy as sa
from support import execute, seed, states

from worker import db
from worker.queue import QueueRepository, Recovered


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_recovery_skips_a_row_locked_by_another_session(backend: str, db_url: str) -> None:
    a, _b, c = seed(db_url, 3)
    engine = db.create_engine(db_url, pool_size=4)
    holder = engine.connect()
    trans = holder.begin()
    try:
        repo = QueueRepository(engine)
        dead = repo.register_run("gone", 1, "run", lease_seconds=1)
        repo.claim(dead, "tok", 3)
        assert repo.fence([(c, "tok")]) == ({c}, set())
        execute(db_url, "UPDATE ejecuciones SET latido_at = :t", t=dt.datetime(2000, 1, 1))
        # An operator's open transaction holds row a's lock.
        holder.execute(sa.text("SELECT id FROM cola_envios WHERE id = :i FOR UPDATE"), {"i": a})

        done: list[Recovered] = []
        worker = threading.Thread(target=lambda: done.append(repo.recover()), daemon=True)
        t0 = time.monotonic()
        worker.start()
        worker.join(timeout=15)
        elapsed = time.monotonic() - t0
        if not done:
            trans.rollback()  # let the stalled recovery finish before the database is dropped
            worker.join(timeout=60)
            pytest.fail("recovery waited on the locked row")
        assert elapsed < 10
        [first] = done
        assert (first.runs, first.requeued, first.uncertain) == (1, 1, 1)
        assert states(db_url) == {"procesando": 1, "pendiente": 1, "incierto": 1}

        trans.rollback()  # the lock goes: a later recovery takes the row
        second = repo.recover()
        assert (second.runs, second.requeued, second.uncertain) == (0, 1, 0)
        assert states(db_url) == {"pendiente": 2, "incierto": 1}
    finally:
        if trans.is_active:
            trans.rollback()
        holder.close()
        engine.dispose()
