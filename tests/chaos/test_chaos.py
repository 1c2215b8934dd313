"""The chaos test (G1-G3 under faults): see scenario.py for what happens and
checker.py for what is checked.

``pytest tests`` runs the reduced version (2,000 messages per database,
4 host runs plus cron-style runs, one kill of the database server).
``make chaos`` sets ``COLA_CHAOS_FULL=1``: 10,000 messages per database,
8 host runs plus cron-style runs, two kills of the database server; the
figures go to ``bench/results/chaos.json`` (``COLA_CHAOS_OUT`` overrides) and
are printed. ``COLA_CHAOS_SEED`` fixes the seed (default: a fresh one, printed
with the result).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _skip_or_fail, fresh_database
from scenario import ChaosPlan, ChaosResult, ChaosRun, KillableServer
from support import PROJECT, PrivateMariaDB, PrivatePostgres, ServerUnavailable

FULL = os.environ.get("COLA_CHAOS_FULL") == "1"
SEED = int(os.environ.get("COLA_CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
OUT = os.environ.get("COLA_CHAOS_OUT") or (str(PROJECT / "bench" / "results" / "chaos.json") if FULL else "")

REDUCED = ChaosPlan(messages=2000, hosts=4, chaos_seconds=60, db_kill_at=(0.3,), drain_seconds=180)
FULL_PLAN = ChaosPlan(messages=10000, hosts=8, chaos_seconds=300, db_kill_at=(0.25, 0.6), drain_seconds=300)


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, KillableServer | None]]:
    """A private server of the parametrised backend, killed by the scenario;
    PostgreSQL falls back to a scratch database on the shared server (never
    killed) when no server binaries are installed."""
    backend = request.param
    private: PrivateMariaDB | PrivatePostgres | None = None
    try:
        if backend == "mysql":
            # Commits reach the OS at once (safe against a killed server), flushed to disk once a second.
            private = PrivateMariaDB(["--innodb-flush-log-at-trx-commit=2", "--max-connections=400"])
        else:
            private = PrivatePostgres()
    except ServerUnavailable as exc:
        if backend == "mysql":
            _skip_or_fail(str(exc))
        scratch = fresh_database(backend, tmp_path)
        try:
            yield scratch.url, None
        finally:
            scratch.drop()
        return
    try:
        private.start()
        yield private.url, private
    finally:
        private.close()


def _save(result: ChaosResult) -> None:
    if not OUT:
        return
    path = Path(OUT)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    saved["command"] = "make chaos" if FULL else "pytest tests/chaos"
    saved["generated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    saved.setdefault("scenarios", {})[result.backend] = result.as_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2) + "\n")


@pytest.mark.slow
@pytest.mark.timeout(1800 if FULL else 600)
@pytest.mark.parametrize("server", ["mysql", "postgresql"], indirect=True)
def test_chaos_nothing_lost_nothing_sent_twice(
    server: tuple[str, KillableServer | None], tmp_path: Path
) -> None:
    url, killable = server
    backend = "mysql" if url.startswith("mysql") else "postgresql"
    plan = FULL_PLAN if FULL else REDUCED
    plan = dataclasses.replace(plan, seed=SEED)
    workdir = tmp_path / "chaos"
    workdir.mkdir()
    result = ChaosRun(url, backend, killable, workdir, plan).run()
    _save(result)
    table = result.report.table(f"chaos {backend}")
    print(table)
    print(result.summary())
    assert result.report.ok, f"{table}\n{result.summary()}\nlogs and ledger: {workdir}"
    # The scenario really happened: runs were killed, the database died, faults fired.
    assert result.kills >= 10, result.summary()
    if killable is not None:
        assert result.db_kills == len(plan.db_kill_at), result.summary()
    assert result.report.accepted >= plan.messages * 0.9, result.summary()
    outcomes = result.sandbox["outcomes"]
    for kind in ("fail-before", "fail-after", "stall-after", "reset-after", "throttle"):
        assert outcomes.get(kind, 0) > 0, (kind, outcomes)
