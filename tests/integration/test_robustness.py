"""Failure paths found in review: a loop outliving a dead run, an over-long
provider value, a malformed payload, a run declared dead, phone-number ids."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

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
)
from support import worker_env as base_env

from worker import db
from worker.queue import Attempt, Outcome, QueueRepository
from worker.sandbox import SandboxOptions, SandboxServer


def _sandbox(**options: object) -> SandboxServer:
    server = SandboxServer(SandboxOptions(port=0, **options))  # type: ignore[arg-type]
    server.start()
    return server


def test_loop_recovers_a_run_that_dies_while_it_is_up(sqlite_db_url: str, tmp_path: Path) -> None:
    server = _sandbox()
    try:
        env = base_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            lease_seconds=1,
            poll_interval=0.2,
        )
        loop = start_worker(env, "run", "--loop", "--metrics-port", "0", log=tmp_path / "loop.log")
        try:
            assert wait_until(lambda: scalar(sqlite_db_url, "SELECT COUNT(*) FROM ejecuciones") == 1)
            # Another run holds two rows and dies (its heartbeat stops) after the loop
            # started. The rows are written as that run's claim while their session is
            # paused, so the polling loop cannot take them first.
            ids = seed(sqlite_db_url, 2, session="orphans", session_state="pausada")
            engine = db.create_engine(sqlite_db_url)
            try:
                dead = QueueRepository(engine).register_run("other", 1, "run", lease_seconds=1)
            finally:
                engine.dispose()
            execute(
                sqlite_db_url,
                "UPDATE cola_envios SET estado = 'procesando', claim_token = 'tok', ejecucion_id = :r",
                r=dead,
            )
            execute(sqlite_db_url, "UPDATE sesiones_envio SET estado = 'activa'")
            assert states(sqlite_db_url) == {"procesando": 2}
            assert wait_until(lambda: states(sqlite_db_url)["enviado"] == 2, timeout=20), states(
                sqlite_db_url
            )
            assert {e["job_id"] for e in server.ledger()} == {str(i) for i in ids}
        finally:
            kill_group(loop, 15)
            loop.wait(timeout=20)
    finally:
        server.stop()


def test_an_over_long_provider_value_does_not_fail_its_group(db_url: str) -> None:
    ids = seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        repo = QueueRepository(engine)
        run_id = repo.register_run("h", 1, "run")
        claimed = repo.claim(run_id, "tok", 2)
        fenced, _ = repo.fence([(r.id, "tok") for r in claimed])
        assert fenced == set(ids)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        long_code = "RECIPIENT_NOT_ON_WHATSAPP_OR_BLOCKED_" * 5
        owned = repo.record(
            run_id,
            "webhook",
            [
                Attempt(
                    claimed[0], "tok", Outcome("enviado", "accepted", True, message_id="m" * 300), now, 5
                ),
                Attempt(
                    claimed[1],
                    "tok",
                    Outcome("error", "permanent", True, code=long_code, text="x" * 5000),
                    now,
                    5,
                ),
            ],
        )
        assert owned == [True, True]
    finally:
        engine.dispose()
    table = rows(db_url)
    assert table[ids[0]]["estado"] == "enviado" and len(table[ids[0]]["proveedor_msg_id"]) == 128
    assert table[ids[1]]["estado"] == "error" and table[ids[1]]["error_codigo"] == long_code[:31] + "…"
    assert len(table[ids[1]]["error_texto"]) == 1000


def test_a_malformed_payload_is_an_error_and_nothing_goes_out(sqlite_db_url: str, tmp_path: Path) -> None:
    server = _sandbox()
    try:
        [bad, good] = seed(sqlite_db_url, 2)
        execute(
            sqlite_db_url,
            "UPDATE cola_envios SET tipo = 'template', payload = :p WHERE id = :i",
            p=json.dumps({"template": "t", "language": "es", "params": 5}),
            i=bad,
        )
        env = base_env(sqlite_db_url, tmp_path, provider="fake", fake_base_url=server.base_url)
        assert run_worker(env, "run").returncode == 0
        table = rows(sqlite_db_url)
        assert (table[bad]["estado"], table[bad]["error_codigo"]) == ("error", "invalid_payload")
        assert table[good]["estado"] == "enviado"
        assert [e["job_id"] for e in server.ledger()] == [str(good)]
    finally:
        server.stop()


def test_a_run_declared_dead_stops_and_exits_1(sqlite_db_url: str, tmp_path: Path) -> None:
    server = _sandbox(latency_ms=300)
    try:
        seed(sqlite_db_url, 20)
        env = base_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            concurrency=1,
            lease_seconds=1,
        )
        proc = start_worker(env, "run", "--batch-size", "5", log=tmp_path / "dead.log")
        try:
            assert wait_until(lambda: states(sqlite_db_url)["enviado"] >= 1, timeout=20)
            execute(sqlite_db_url, "UPDATE ejecuciones SET estado = 'muerta'")
            assert proc.wait(timeout=30) == 1
        finally:
            kill_group(proc)
        log = (tmp_path / "dead.log").read_text()
        assert "declared dead" in log
        st = states(sqlite_db_url)
        assert st["enviado"] < 20 and st["procesando"] == 0 and st["enviando"] == 0
    finally:
        server.stop()


def test_customer_ids_that_are_phone_numbers_are_masked_in_logs(sqlite_db_url: str, tmp_path: Path) -> None:
    server = _sandbox()
    try:
        [row_id] = seed(sqlite_db_url, 1)
        execute(
            sqlite_db_url,
            "UPDATE cola_envios SET cliente_id = telefono, cliente_nombre = NULL WHERE id = :i",
            i=row_id,
        )
        env = base_env(sqlite_db_url, tmp_path, provider="fake", fake_base_url=server.base_url)
        proc = run_worker(env, "run")
        assert proc.returncode == 0, proc.stderr
        assert phone(0) not in proc.stderr and phone(0)[1:] not in proc.stderr
        assert proc.stderr.count("+51*****0000") >= 2  # the customer and the recipient, both masked
    finally:
        server.stop()


def test_recording_again_after_a_commit_that_looked_failed_writes_nothing_twice(db_url: str) -> None:
    """The group writer re-writes a failed group row by row; if the group's
    COMMIT had in fact succeeded, the second write must change nothing."""
    ids = seed(db_url, 2)
    engine = db.create_engine(db_url)
    try:
        repo = QueueRepository(engine)
        run_id = repo.register_run("h", 1, "run")
        claimed = repo.claim(run_id, "tok", 2)
        repo.fence([(r.id, "tok") for r in claimed])
        started = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        attempts = [
            Attempt(r, "tok", Outcome("enviado", "accepted", True, message_id=f"wamid.{r.id}"), started, 3)
            for r in claimed
        ]
        assert repo.record(run_id, "fake", attempts) == [True, True]
        assert [repo.record(run_id, "fake", [a]) for a in attempts] == [[True], [True]]
    finally:
        engine.dispose()
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio") == 2
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == 2
    assert states(db_url) == {"enviado": 2}
    assert sorted(rows(db_url)) == ids
