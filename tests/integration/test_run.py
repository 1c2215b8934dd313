"""`cola-worker run` against real databases (SQLite, MariaDB, PostgreSQL) and
the local sandbox, in real processes."""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import (
    execute,
    kill_group,
    phone,
    rows,
    run_worker,
    scalar,
    seed,
    start_worker,
    states,
    wait_until,
    worker_env,
)

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer


def make_sandbox(**options: object) -> SandboxServer:
    server = SandboxServer(SandboxOptions(port=0, **options))  # type: ignore[arg-type]
    server.start()
    return server


def env_for(url: str, tmp_path: Path, server: SandboxServer, **extra: object) -> dict[str, str]:
    return worker_env(url, tmp_path, provider="fake", fake_base_url=server.base_url, **extra)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def ledger_jobs(server: SandboxServer) -> Counter[str]:
    return Counter(entry["job_id"] for entry in server.ledger())


def test_run_sends_every_row_once_and_logs_it(db_url: str, tmp_path: Path, sandbox: SandboxServer) -> None:
    ids = seed(db_url, 30, text="secret body")
    proc = run_worker(env_for(db_url, tmp_path, sandbox), "run", "--concurrency", "4")
    assert proc.returncode == 0, proc.stderr
    assert states(db_url) == Counter({"enviado": 30})
    assert ledger_jobs(sandbox) == Counter({str(i): 1 for i in ids})
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == 30
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio WHERE resultado = 'accepted'") == 30
    run = scalar(db_url, "SELECT estado FROM ejecuciones")
    assert run == "terminada"
    err = proc.stderr
    assert "started: pid" in err and "max-jobs 50" in err  # start line with limits
    assert "[30/30]" in err and "Cliente" in err and "enviado" in err  # one line per message
    assert "+51*****" in err and phone(0) not in err  # masked, never the full number
    assert "secret body" not in err  # bodies are never logged
    assert "ended: claimed 30, sent 30" in err


def test_json_logs(db_url: str, tmp_path: Path, sandbox: SandboxServer) -> None:
    import json

    seed(db_url, 3)
    proc = run_worker(env_for(db_url, tmp_path, sandbox), "run", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    actions = [line.get("action") for line in lines]
    assert actions[0] == "run_start" and actions[-1] == "run_end"
    messages = [line for line in lines if line.get("action") == "message"]
    assert len(messages) == 3
    assert all(m["to"].startswith("+51*****") and m["outcome"] == "enviado" for m in messages)


def test_max_jobs_caps_the_run_and_leaves_nothing_claimed(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    seed(db_url, 25)
    proc = run_worker(env_for(db_url, tmp_path, sandbox), "run", "--max-jobs", "10", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert states(db_url) == Counter({"enviado": 10, "pendiente": 15})
    proc = run_worker(env_for(db_url, tmp_path, sandbox), "run", "--max-jobs", "0")
    assert proc.returncode == 0, proc.stderr
    assert states(db_url) == Counter({"enviado": 25})
    assert sum(ledger_jobs(sandbox).values()) == 25


def test_max_seconds_ends_the_run_cleanly(db_url: str, tmp_path: Path) -> None:
    server = make_sandbox(latency_ms=300)
    try:
        seed(db_url, 20)
        env = env_for(db_url, tmp_path, server)
        proc = run_worker(env, "run", "--max-seconds", "1", "--concurrency", "1")
        assert proc.returncode == 0, proc.stderr
        st = states(db_url)
        assert 1 <= st["enviado"] <= 6
        assert st["enviado"] + st["pendiente"] == 20  # nothing left procesando/enviando
    finally:
        server.stop()


OUTCOMES = {
    "invalid": ("error", 1, "131026"),
    "fail-before": ("pendiente", 1, "131000"),
    "throttle": ("pendiente", 0, "130429"),
    "pair-throttle": ("pendiente", 0, "131056"),
    "fail-after": ("incierto", 1, None),
    "reset-after": ("incierto", 1, None),
    "stall-after": ("incierto", 1, None),
}
EVERY_BACKEND = ("invalid", "fail-after", "throttle")


@pytest.mark.parametrize("fault", EVERY_BACKEND)
def test_provider_outcomes_on_every_backend(db_url: str, tmp_path: Path, fault: str) -> None:
    check_outcome(db_url, tmp_path, fault)


@pytest.mark.parametrize("fault", sorted(set(OUTCOMES) - set(EVERY_BACKEND)))
def test_provider_outcomes_more_kinds(sqlite_db_url: str, tmp_path: Path, fault: str) -> None:
    # The mapping does not depend on the database: the other kinds run on SQLite.
    check_outcome(sqlite_db_url, tmp_path, fault)


def check_outcome(db_url: str, tmp_path: Path, fault: str) -> None:
    estado, intentos, code = OUTCOMES[fault]
    server = make_sandbox(stall_seconds=5)
    try:
        [row_id, ok_id] = seed(db_url, 2)
        server.set_faults({phone(0)[1:]: fault})
        env = env_for(db_url, tmp_path, server, read_timeout=0.5)
        proc = run_worker(env, "run")
        assert proc.returncode == 0, proc.stderr
        table = rows(db_url)
        assert table[ok_id]["estado"] == "enviado"
        bad = table[row_id]
        assert bad["estado"] == estado
        assert bad["intentos"] == intentos
        if code is not None:
            assert bad["error_codigo"] == code
        if estado == "pendiente":
            assert bad["claim_token"] is None and bad["ejecucion_id"] is None
            wait = bad["proximo_intento_at"] - bad["actualizado_at"]
            assert wait >= dt.timedelta(seconds=0.9)  # rescheduled, not hot-looped
        in_ledger = str(row_id) in ledger_jobs(server)
        assert in_ledger == (fault in ("fail-after", "reset-after", "stall-after"))
        journal = scalar(db_url, "SELECT COUNT(*) FROM intentos_envio WHERE cola_envio_id = :i", i=row_id)
        assert journal == 1
    finally:
        server.stop()


def test_retryable_until_attempts_run_out_then_error(db_url: str, tmp_path: Path) -> None:
    server = make_sandbox()
    try:
        [row_id] = seed(db_url, 1, max_attempts=2)
        server.set_faults({phone(0)[1:]: "fail-before"})
        env = env_for(db_url, tmp_path, server, backoff_base=0.2, backoff_max=0.2)
        assert run_worker(env, "run").returncode == 0
        first = rows(db_url)[row_id]
        assert (first["estado"], first["intentos"]) == ("pendiente", 1)
        assert first["proximo_intento_at"] > first["actualizado_at"]  # backoff stored in the row
        time.sleep(0.3)
        assert run_worker(env, "run").returncode == 0
        second = rows(db_url)[row_id]
        assert (second["estado"], second["intentos"]) == ("error", 2)
        assert "attempts exhausted" in second["error_texto"]
        assert ledger_jobs(server) == Counter()
    finally:
        server.stop()


def test_sender_blocked_stops_the_run_exit_4_rows_untouched(db_url: str, tmp_path: Path) -> None:
    server = make_sandbox(token="the-right-token")
    try:
        seed(db_url, 5)
        env = env_for(db_url, tmp_path, server, concurrency=1)
        env["COLA_META_TOKEN"] = "wrong-token-s3cr3t"
        proc = run_worker(env, "run")
        assert proc.returncode == 4, proc.stderr
        table = rows(db_url)
        assert all(r["estado"] == "pendiente" and r["intentos"] == 0 for r in table.values())
        assert all(r["claim_token"] is None for r in table.values())
        attempts = scalar(db_url, "SELECT COUNT(*) FROM intentos_envio")
        assert attempts == 1  # stopped after the first refusal
        assert "wrong-token-s3cr3t" not in proc.stderr + proc.stdout
    finally:
        server.stop()


def test_expired_rows_are_cancelled_never_sent_late(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    past = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=5)
    [expired] = seed(db_url, 1, session="old", enviar_hasta=past)
    [fresh] = seed(db_url, 1, session="new", start=1)
    proc = run_worker(env_for(db_url, tmp_path, sandbox), "run")
    assert proc.returncode == 0, proc.stderr
    table = rows(db_url)
    assert table[expired]["estado"] == "cancelado" and table[expired]["error_codigo"] == "expired"
    assert table[fresh]["estado"] == "enviado"
    assert str(expired) not in ledger_jobs(sandbox)


def test_paused_sessions_are_not_claimed_and_session_flag_limits(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    a = seed(db_url, 3, session="a")
    b = seed(db_url, 3, session="b", start=3)
    c = seed(db_url, 3, session="c", start=6, session_state="pausada")
    env = env_for(db_url, tmp_path, sandbox)
    proc = run_worker(env, "run", "--session", "b")
    assert proc.returncode == 0, proc.stderr
    table = rows(db_url)
    assert [table[i]["estado"] for i in b] == ["enviado"] * 3
    assert [table[i]["estado"] for i in a + c] == ["pendiente"] * 6
    assert run_worker(env, "run").returncode == 0
    table = rows(db_url)
    assert [table[i]["estado"] for i in a] == ["enviado"] * 3
    assert [table[i]["estado"] for i in c] == ["pendiente"] * 3  # paused: never claimed
    assert run_worker(env, "run", "--session", "nope").returncode == 2


def test_dry_run_writes_nothing_and_takes_no_lock(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    seed(db_url, 4)
    before = rows(db_url)
    env = env_for(db_url, tmp_path, sandbox)
    proc = run_worker(env, "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "4 message(s) would be sent" in proc.stdout
    assert "+51*****" in proc.stdout
    assert rows(db_url) == before
    assert scalar(db_url, "SELECT COUNT(*) FROM ejecuciones") == 0
    assert ledger_jobs(sandbox) == Counter()
    assert not (tmp_path / "locks" / "run.lock").exists()


def test_run_without_provider_is_refused(db_url: str, tmp_path: Path) -> None:
    seed(db_url, 1)
    proc = run_worker(worker_env(db_url, tmp_path), "run")
    assert proc.returncode == 2
    assert "COLA_PROVIDER" in proc.stderr
    assert states(db_url) == Counter({"pendiente": 1})


def test_run_refuses_schema_behind(db_url: str, tmp_path: Path, sandbox: SandboxServer) -> None:
    seed(db_url, 1)
    execute(db_url, "UPDATE alembic_version SET version_num = '0000'")
    proc = run_worker(env_for(db_url, tmp_path, sandbox), "run")
    assert proc.returncode == 2
    assert "db upgrade" in proc.stderr
    assert states(db_url) == Counter({"pendiente": 1})


def test_changed_claim_token_means_the_row_is_not_sent(db_url: str, tmp_path: Path) -> None:
    server = make_sandbox(latency_ms=700)
    try:
        ids = seed(db_url, 4)
        env = env_for(db_url, tmp_path, server, concurrency=1)
        proc = start_worker(env, "run", log=tmp_path / "run.log")
        try:
            # Wait until the first row is on the wire; the last is still only claimed.
            assert wait_until(lambda: rows(db_url)[ids[0]]["estado"] == "enviando", timeout=20)
            assert rows(db_url)[ids[-1]]["estado"] == "procesando"
            assert (
                execute(db_url, "UPDATE cola_envios SET claim_token = 'stolen' WHERE id = :i", i=ids[-1]) == 1
            )
            assert proc.wait(timeout=30) == 0
        finally:
            kill_group(proc)
        table = rows(db_url)
        assert [table[i]["estado"] for i in ids[:-1]] == ["enviado"] * 3
        assert table[ids[-1]]["estado"] == "procesando" and table[ids[-1]]["claim_token"] == "stolen"
        assert str(ids[-1]) not in ledger_jobs(server)
        assert "no longer ours" in (tmp_path / "run.log").read_text()
    finally:
        server.stop()


def test_sigkill_mid_batch_then_recovery(db_url: str, tmp_path: Path) -> None:
    server = make_sandbox(latency_ms=1500)
    try:
        seed(db_url, 6)
        env = env_for(db_url, tmp_path, server, concurrency=2, lease_seconds=6)
        proc = start_worker(env, "run", log=tmp_path / "killed.log")
        assert wait_until(lambda: states(db_url)["enviando"] == 2, timeout=20)
        kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=10)
        before = states(db_url)
        assert before["enviando"] == 2 and before["procesando"] == 4
        # A recovery inside the dead run's own lease does not touch its rows
        # (whatever the lease of the process that recovers).
        quick = env_for(db_url, tmp_path, server, lease_seconds=1)
        assert run_worker(quick, "recover").returncode == 0
        assert states(db_url) == before
        time.sleep(6.5)
        proc2 = run_worker(env, "run", timeout=60)
        assert proc2.returncode == 0, proc2.stderr
        assert "recovered 1 dead run(s): 4 row(s) back to pendiente, 2 to incierto" in proc2.stderr
        final = states(db_url)
        assert final == Counter({"enviado": 4, "incierto": 2})
        # The two maybe-sent rows were never sent a second time.
        assert max(ledger_jobs(server).values()) == 1
        assert scalar(db_url, "SELECT COUNT(*) FROM ejecuciones WHERE estado = 'muerta'") == 1
    finally:
        server.stop()


def test_sigterm_finishes_in_flight_and_releases_the_rest(db_url: str, tmp_path: Path) -> None:
    server = make_sandbox(latency_ms=1000)
    try:
        ids = seed(db_url, 10)
        env = env_for(db_url, tmp_path, server, concurrency=2)
        proc = start_worker(env, "run", log=tmp_path / "term.log")
        assert wait_until(lambda: states(db_url)["enviando"] == 2, timeout=20)
        in_flight = {i for i, r in rows(db_url).items() if r["estado"] == "enviando"}
        kill_group(proc, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        after = rows(db_url)
        sent = ledger_jobs(server)
        journal = {
            int(r[0])
            for r in query(db_url, "SELECT cola_envio_id FROM intentos_envio WHERE resultado = 'accepted'")
        }
        assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio") == len(journal)
        # The messages in flight at the signal were finished and their answers recorded.
        assert in_flight <= journal
        # Every row that reached the provider ended enviado, accepted once.
        for i in journal:
            assert after[i]["estado"] == "enviado" and sent[str(i)] == 1, after[i]
        # Every row claimed but never fenced went back to pendiente untouched:
        # no attempt spent, no token, no owner, never sent.
        unsent = set(ids) - journal
        for i in unsent:
            r = after[i]
            got = (r["estado"], r["intentos"], r["claim_token"], r["ejecucion_id"])
            assert got == ("pendiente", 0, None, None), r
            assert str(i) not in sent
        assert len(unsent) >= 6  # the signal stopped the run: no new claims, no new sends
        assert states(db_url) == Counter({"enviado": len(journal), "pendiente": len(unsent)})
        assert sum(sent.values()) == len(journal)
        log = (tmp_path / "term.log").read_text()
        assert "SIGTERM received" in log
        assert f"claimed 10, sent {len(journal)}" in log and f"released {len(unsent)}" in log
    finally:
        server.stop()


def test_recovery_never_takes_a_live_runs_rows(db_url: str, tmp_path: Path) -> None:
    ids = seed(db_url, 2)
    now_sql = {
        "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
        "mysql": "UTC_TIMESTAMP(6)",
        "postgresql": "(now() AT TIME ZONE 'UTC')",
    }
    url = db_url
    dialect = "sqlite" if url.startswith("sqlite") else ("postgresql" if "postgres" in url else "mysql")
    execute(
        url,
        "INSERT INTO ejecuciones (host, pid, modo, iniciada_at, latido_at, estado, lease_segundos, "
        f"reclamados, enviados, errores, inciertos, reintentos) VALUES ('h', 1, 'run', {now_sql[dialect]}, "
        f"{now_sql[dialect]}, 'activa', 60, 0, 0, 0, 0, 0)",
    )
    run_id = scalar(url, "SELECT MAX(id) FROM ejecuciones")
    execute(
        url,
        "UPDATE cola_envios SET estado = 'procesando', claim_token = 't', ejecucion_id = :r WHERE id = :i",
        r=run_id,
        i=ids[0],
    )
    execute(
        url,
        "UPDATE cola_envios SET estado = 'enviando', claim_token = 't', ejecucion_id = :r WHERE id = :i",
        r=run_id,
        i=ids[1],
    )
    env = worker_env(url, tmp_path, lease_seconds=1)  # the run's own lease (60 s) decides
    time.sleep(1.2)
    assert run_worker(env, "recover").returncode == 0
    assert states(url) == Counter({"procesando": 1, "enviando": 1})
    # Silent for longer than its own lease now.
    execute(url, "UPDATE ejecuciones SET latido_at = :t WHERE id = :r", t=dt.datetime(2000, 1, 1), r=run_id)
    proc = run_worker(env, "recover", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"requeued": 1' in proc.stdout and '"incierto": 1' in proc.stdout
    assert states(url) == Counter({"pendiente": 1, "incierto": 1})


def test_dry_run_says_why_rows_wait_and_checks_the_provider(db_url: str, tmp_path: Path) -> None:
    seed(db_url, 2, session="later")
    execute(db_url, "UPDATE cola_envios SET proximo_intento_at = :t", t=dt.datetime(2100, 1, 1))
    seed(db_url, 1, session="paused", start=10, session_state="pausada")
    env = worker_env(db_url, tmp_path, provider="meta")  # no phone number id, no token
    proc = run_worker(env, "run", "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "0 message(s) would be sent" in proc.stdout
    assert "not due: session later: 2 pendiente, scheduled later" in proc.stdout
    assert "not due: session paused: 1 pendiente, session paused" in proc.stdout
    assert "COLA_META_PHONE_NUMBER_ID" in proc.stderr or "COLA_META_TOKEN" in proc.stderr

    ok = run_worker(worker_env(db_url, tmp_path, provider="fake"), "run", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "provider fake: configuration complete" in ok.stdout
    missing = run_worker(worker_env(db_url, tmp_path), "run", "--dry-run")
    assert missing.returncode == 2 and "COLA_PROVIDER" in missing.stderr
