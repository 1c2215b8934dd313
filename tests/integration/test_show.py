"""`cola-worker show`: one row's history, and a session's rows in a state."""

from __future__ import annotations

import json
from pathlib import Path

from support import execute, run_worker, seed, worker_env

from worker.sandbox import SandboxOptions, SandboxServer


def test_show_a_row_that_failed_then_was_sent_and_a_session_by_state(db_url: str, tmp_path: Path) -> None:
    [retried, invalid, sent] = seed(db_url, 3, recipients=["+51999000001", "+51999000002", "+51999000003"])
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    try:
        # The first row meets a temporary error (retried later), the second an invalid recipient.
        server.set_faults({"+51999000001": "fail-before", "+51999000002": "invalid"})
        env = worker_env(db_url, tmp_path, provider="fake", fake_base_url=server.base_url)
        assert run_worker(env, "run").returncode == 0
        server.set_faults({"+51999000001": None})
        execute(db_url, "UPDATE cola_envios SET proximo_intento_at = creado_at WHERE estado = 'pendiente'")
        assert run_worker(env, "run").returncode == 0
    finally:
        server.stop()

    proc = run_worker(worker_env(db_url, tmp_path), "show", "--id", str(retried), "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["id"] == str(retried) and row["state"] == "enviado" and row["to"] == "+51*****0001"
    assert [a["outcome"] for a in row["history"]] == ["retryable", "accepted"]
    first, second = row["history"]
    assert first["http_status"] == 500 and first["code"] == "131000" and first["source"] == "run"
    assert second["provider_message_id"] == row["provider_message_id"] and second["latency_ms"] is not None
    assert row["message"] == "text" and "hola" not in proc.stdout  # never the body

    text = run_worker(worker_env(db_url, tmp_path), "show", "--id", str(invalid))
    assert text.returncode == 0, text.stderr
    assert "error" in text.stdout and "131026" in text.stdout and "+51*****0002" in text.stdout
    assert "999000002" not in text.stdout

    listed = run_worker(worker_env(db_url, tmp_path), "show", "--session", "s1", "--state", "error", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["total"] == 1 and [r["id"] for r in data["rows"]] == [str(invalid)]
    assert data["rows"][0]["error_code"] == "131026"
    assert sent not in [int(r["id"]) for r in data["rows"]]


def test_show_refuses_bad_input_naming_the_field(sqlite_db_url: str, tmp_path: Path) -> None:
    env = worker_env(sqlite_db_url, tmp_path)
    seed(sqlite_db_url, 1)
    for args, field in (
        (("show",), "--id"),
        (("show", "--id", "12345"), "--id"),
        (("show", "--session", "nope"), "--session"),
        (("show", "--session", "s1", "--state", "enviadoo"), "--state"),
    ):
        proc = run_worker(env, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert field in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
