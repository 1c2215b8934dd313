"""A provider that cannot be reached does not burn the queue: connection
failures (nothing was sent) spend no attempt, and a few in a row stop the run
with exit 6, its rows back in `pendiente` untouched. A retry's reason is in its
log line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support import free_port, phone, rows, run_worker, scalar, seed, states, worker_env

from worker.sandbox import SandboxServer


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connection refused)."""
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_provider_down_stops_the_run_with_exit_6_and_spends_nothing(
    sqlite_db_url: str, tmp_path: Path, closed_port: int
) -> None:
    seed(sqlite_db_url, 30, max_attempts=3)
    before = rows(sqlite_db_url)
    env = worker_env(
        sqlite_db_url,
        tmp_path,
        provider="fake",
        fake_base_url=f"http://127.0.0.1:{closed_port}",
        concurrency=2,
        max_connect_failures=4,
    )
    proc = run_worker(env, "run")
    assert proc.returncode == 6, proc.stderr
    after = rows(sqlite_db_url)
    for row_id, row in after.items():
        assert row["estado"] == "pendiente", row
        assert row["intentos"] == before[row_id]["intentos"] == 0
        assert row["claim_token"] is None and row["ejecucion_id"] is None
        # No backoff: each row is due again as soon as the provider is back.
        assert row["proximo_intento_at"] == before[row_id]["proximo_intento_at"]
    # It stopped after the configured number of failures, not after the whole queue.
    tried = scalar(sqlite_db_url, "SELECT COUNT(*) FROM intentos_envio")
    assert 4 <= tried < 30
    assert scalar(sqlite_db_url, "SELECT COUNT(*) FROM intentos_envio WHERE resultado <> 'unreachable'") == 0
    err = proc.stderr
    assert f"127.0.0.1:{closed_port}" in err
    assert "ConnectError" in err
    assert "provider unreachable" in err
    assert "Traceback" not in err


def test_a_provider_that_comes_back_is_used_and_nothing_was_lost(
    sqlite_db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    """After an exit 6 the next run sends every row once, each with its first attempt."""
    ids = seed(sqlite_db_url, 6, max_attempts=1)
    down = worker_env(
        sqlite_db_url,
        tmp_path,
        provider="fake",
        fake_base_url=f"http://127.0.0.1:{free_port()}",
        max_connect_failures=2,
        concurrency=1,
    )
    assert run_worker(down, "run").returncode == 6
    assert states(sqlite_db_url) == {"pendiente": 6}
    up = worker_env(sqlite_db_url, tmp_path, provider="fake", fake_base_url=sandbox.base_url)
    proc = run_worker(up, "run")
    assert proc.returncode == 0, proc.stderr
    assert states(sqlite_db_url) == {"enviado": 6}
    assert sorted(int(e["job_id"]) for e in sandbox.ledger()) == ids


def test_a_retry_logs_its_reason(sqlite_db_url: str, tmp_path: Path, sandbox: SandboxServer) -> None:
    [bad, _ok] = seed(sqlite_db_url, 2)
    sandbox.set_faults({phone(0)[1:]: "fail-before"})
    env = worker_env(sqlite_db_url, tmp_path, provider="fake", fake_base_url=sandbox.base_url)
    proc = run_worker(env, "run")
    assert proc.returncode == 0, proc.stderr
    row = rows(sqlite_db_url)[bad]
    assert (row["estado"], row["intentos"]) == ("pendiente", 1)
    [line] = [ln for ln in proc.stderr.splitlines() if "pendiente (retryable" in ln]
    # The code and the provider's text, as stored in the row, are in the line.
    assert row["error_codigo"] == "131000"
    assert "131000" in line
    assert row["error_texto"][:30] in line
