"""`cola-worker status` as an operator or a script runs it."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from worker import db
from worker.schema import STATES, cola_envios, ejecuciones

CSV = "cliente_id,telefono,mensaje\nc1,+51987654321,uno\nc2,+51987654322,dos\nc3,+51987654323,tres\n"


def run(
    db_url: str, tmp_path: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "cola-worker"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update({"COLA_DATABASE_URL": db_url, "COLA_LOCK_FILE": str(tmp_path / "lock" / "cola.lock")})
    return subprocess.run(
        [*command, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_status_json_after_enqueue(db_url: str, tmp_path: Path) -> None:
    assert (
        run(db_url, tmp_path, "enqueue", "--session", "recordatorios", "--csv", "-", stdin=CSV).returncode
        == 0
    )
    engine = db.create_engine(db_url)
    try:
        with engine.begin() as conn:
            now = db.db_now(conn)
            conn.execute(
                sa.update(cola_envios).where(cola_envios.c.cliente_id == "c3").values(estado="enviado")
            )
            conn.execute(
                ejecuciones.insert(),
                [
                    {
                        "host": "alive",
                        "pid": 1,
                        "modo": "run",
                        "iniciada_at": now,
                        "latido_at": now,
                        "estado": "activa",
                    },
                    {
                        "host": "gone",
                        "pid": 2,
                        "modo": "run",
                        "iniciada_at": now - dt.timedelta(hours=2),
                        "latido_at": now - dt.timedelta(hours=1),
                        "estado": "activa",
                    },
                ],
            )
    finally:
        engine.dispose()

    result = run(db_url, tmp_path, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    [session] = data["sessions"]
    assert session["name"] == "recordatorios" and session["state"] == "activa"
    assert set(session["counts"]) == set(STATES)
    assert session["counts"]["pendiente"] == 2 and session["counts"]["enviado"] == 1
    assert session["due_now"] == 2 and session["oldest_pending_age_seconds"] >= 0
    assert [r["host"] for r in data["live_runs"]] == ["alive"]
    assert data["dead_runs"] == 1
    assert data["lock_holder"] is None
    assert dt.datetime.fromisoformat(data["generated_at"]).tzinfo is not None


def test_status_table_and_unknown_session(db_url: str, tmp_path: Path) -> None:
    assert run(db_url, tmp_path, "enqueue", "--session", "campaña", "--csv", "-", stdin=CSV).returncode == 0
    table = run(db_url, tmp_path, "status", "--session", "campaña")
    assert table.returncode == 0, table.stderr
    assert "campaña" in table.stdout and "pendiente" in table.stdout
    missing = run(db_url, tmp_path, "status", "--session", "nope")
    assert missing.returncode == 2 and "no session named 'nope'" in missing.stderr


def test_status_refuses_a_database_without_schema(empty_db_url: str, tmp_path: Path) -> None:
    result = run(empty_db_url, tmp_path, "status", "--json")
    assert result.returncode == 2
    assert "db upgrade" in result.stderr


def test_watch_json_refreshes_until_ctrl_c(db_url: str, tmp_path: Path) -> None:
    import signal
    import time

    exe = Path(sys.executable).parent / "cola-worker"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update({"COLA_DATABASE_URL": db_url, "COLA_LOCK_FILE": str(tmp_path / "lock" / "cola.lock")})
    proc = subprocess.Popen(
        [*command, "status", "--json", "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first snapshot is printed at once
        time.sleep(0.8)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    snapshots = [json.loads(line) for line in [first, *rest.splitlines()] if line.strip()]
    assert len(snapshots) >= 3
    assert all(s["sessions"] == [] and "generated_at" in s for s in snapshots)


def test_live_run_counters_are_current_while_it_runs(sqlite_db_url: str, tmp_path: Path) -> None:
    from support import seed, start_worker, wait_until, worker_env

    from worker.sandbox import SandboxOptions, SandboxServer

    seed(sqlite_db_url, 40)
    server = SandboxServer(SandboxOptions(port=0, latency_ms=300))
    server.start()
    try:
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            concurrency=2,
            max_jobs=0,
            lease_seconds=2,
        )
        proc = start_worker(env, "run")
        try:

            def live_sent() -> int:
                data = json.loads(run(sqlite_db_url, tmp_path, "status", "--json").stdout)
                return max((r["counts"]["sent"] for r in data["live_runs"]), default=0)

            # The run is still going (40 rows at 2 in flight and 300 ms each: about 6 s) and
            # the status already shows what it sent, not the zeros it registered with.
            assert wait_until(lambda: live_sent() >= 4, timeout=30, interval=0.3)
            assert proc.poll() is None
        finally:
            proc.wait(timeout=60)
    finally:
        server.stop()
