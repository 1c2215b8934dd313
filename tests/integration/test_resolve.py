"""`cola-worker resolve`: settle incierto rows by hand, and the list of those
still waiting (status, audit)."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import execute, phone, rows, run_worker, scalar, seed, states, worker_env

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    # Recipient 0 is accepted and then the connection is reset: the run cannot
    # know, so its row ends incierto (the provider did deliver it).
    server = SandboxServer(SandboxOptions(port=0, faults=((phone(0)[1:], "reset-after"),)))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _run(url: str, tmp_path: Path, server: SandboxServer) -> None:
    env = worker_env(url, tmp_path, provider="fake", fake_base_url=server.base_url, max_attempts=1)
    proc = run_worker(env, "run")
    assert proc.returncode == 0, proc.stderr


def _journal(url: str, job: int) -> list[dict[str, Any]]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    sa.text("SELECT * FROM intentos_envio WHERE cola_envio_id = :i ORDER BY id"), {"i": job}
                )
            ]
    finally:
        engine.dispose()


def _make_older(url: str, job: int, by: dt.timedelta) -> None:
    """The row became incierto ``by`` earlier (its actualizado_at moves back)."""
    then = rows(url)[job]["actualizado_at"] - by
    execute(url, "UPDATE cola_envios SET actualizado_at = :t WHERE id = :i", t=then, i=job)


def _audit(url: str, tmp_path: Path) -> tuple[int, dict[str, Any]]:
    proc = run_worker(worker_env(url, tmp_path), "audit", "--json")
    return proc.returncode, json.loads(proc.stdout)


def test_resolve_sent_records_the_delivery_without_sending(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    [unsure, fine] = seed(db_url, 2)
    _run(db_url, tmp_path, sandbox)
    assert rows(db_url)[unsure]["estado"] == "incierto"
    delivered = [e for e in sandbox.ledger() if phone(0)[1:] in json.dumps(e)]
    assert len(delivered) == 1  # the provider did take it
    before = len(sandbox.ledger())

    env = worker_env(db_url, tmp_path)
    proc = run_worker(
        env,
        "resolve",
        "--id",
        str(unsure),
        "--sent",
        "--provider-id",
        "wamid.SEEN",
        "--by",
        "ana",
        "--reason",
        "seen in the provider console",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resolved"] == [unsure]
    row = rows(db_url)[unsure]
    assert row["estado"] == "enviado" and row["proveedor_msg_id"] == "wamid.SEEN"
    assert row["claim_token"] is None and row["enviado_at"] is not None
    assert (
        scalar(db_url, "SELECT proveedor_msg_id FROM envios_whatsapp WHERE cola_envio_id = :i", i=unsure)
        == "wamid.SEEN"
    )
    manual = [j for j in _journal(db_url, unsure) if j["origen"] == "manual"]
    assert [j["resultado"] for j in manual] == ["accepted"]
    note = manual[0]["nota"]
    assert getpass.getuser() in note and "ana" in note and "seen in the provider console" in note

    # Nothing was sent, now or by a later run; the audit finds nothing.
    _run(db_url, tmp_path, sandbox)
    assert len(sandbox.ledger()) == before
    assert states(db_url) == Counter({"enviado": 2})
    assert rows(db_url)[fine]["estado"] == "enviado"
    code, report = _audit(db_url, tmp_path)
    assert code == 0 and report["problems"] == 0, report
    assert report["incierto_waiting_for_operator"] == 0 and report["incierto_oldest"] == []


def test_resolve_not_sent_requeues_and_the_next_run_sends(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    [unsure] = seed(db_url, 1)
    _run(db_url, tmp_path, sandbox)
    before = rows(db_url)[unsure]
    assert before["estado"] == "incierto" and before["intentos"] == 1

    proc = run_worker(worker_env(db_url, tmp_path), "resolve", "--id", str(unsure), "--not-sent")
    assert proc.returncode == 0, proc.stderr
    assert f"resolved 1 row(s) as pendiente (due now): {unsure}" in proc.stdout
    after = rows(db_url)[unsure]
    assert after["estado"] == "pendiente" and after["intentos"] == 1  # attempts kept
    assert after["claim_token"] is None and after["ejecucion_id"] is None
    assert after["proximo_intento_at"] <= after["actualizado_at"]
    assert [(j["resultado"], j["origen"]) for j in _journal(db_url, unsure)][-1] == ("not_sent", "manual")

    # The next run sends it (the recipient's line is healthy now).
    sandbox.set_faults({}, replace=True)
    _run(db_url, tmp_path, sandbox)
    assert rows(db_url)[unsure]["estado"] == "enviado"
    code, report = _audit(db_url, tmp_path)
    assert code == 0 and report["incierto_waiting_for_operator"] == 0, report


def test_resolve_refuses_rows_in_any_other_state_and_writes_nothing(db_url: str, tmp_path: Path) -> None:
    [unsure, failed, waiting] = seed(db_url, 3)
    execute(
        db_url, "UPDATE cola_envios SET estado = 'incierto', error_codigo = 'timeout' WHERE id = :i", i=unsure
    )
    execute(db_url, "UPDATE cola_envios SET estado = 'error' WHERE id = :i", i=failed)
    env = worker_env(db_url, tmp_path)
    ids = ["--id", str(unsure), "--id", str(failed), "--id", str(waiting), "--id", "999999"]
    for outcome in ("--sent", "--not-sent"):
        proc = run_worker(env, "resolve", *ids, outcome)
        assert proc.returncode == 2, proc.stderr
        assert f"id {failed} is error" in proc.stderr and f"id {waiting} is pendiente" in proc.stderr
        assert "id 999999 not found" in proc.stderr and "Traceback" not in proc.stderr
    assert states(db_url) == Counter({"incierto": 1, "error": 1, "pendiente": 1})
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio") == 0
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == 0
    # An outcome must be given, and only one.
    assert run_worker(env, "resolve", "--id", str(unsure)).returncode == 2
    assert run_worker(env, "resolve", "--id", str(unsure), "--sent", "--not-sent").returncode == 2
    no_rows = run_worker(env, "resolve", "--session", "s1", "--error-code", "other", "--sent")
    assert no_rows.returncode == 2 and "no incierto row matching --error-code other" in no_rows.stderr
    assert states(db_url)["incierto"] == 1


def test_resolve_a_session_with_a_filter(db_url: str, tmp_path: Path) -> None:
    [old_timeout, new_timeout, reset, other_session] = seed(db_url, 3) + seed(
        db_url, 1, session="s2", start=5
    )
    execute(db_url, "UPDATE cola_envios SET estado = 'incierto', error_codigo = 'timeout'")
    execute(db_url, "UPDATE cola_envios SET error_codigo = 'reset' WHERE id = :i", i=reset)
    _make_older(db_url, old_timeout, dt.timedelta(hours=2))
    env = worker_env(db_url, tmp_path)
    old = run_worker(env, "resolve", "--session", "s1", "--older-than-minutes", "60", "--sent", "--json")
    assert old.returncode == 0, old.stderr
    assert json.loads(old.stdout)["resolved"] == [old_timeout]
    timeouts = run_worker(env, "resolve", "--session", "s1", "--error-code", "timeout", "--not-sent")
    assert timeouts.returncode == 0, timeouts.stderr
    assert timeouts.stdout.strip().endswith(f": {new_timeout}")
    table = rows(db_url)
    assert [table[i]["estado"] for i in (old_timeout, new_timeout, reset, other_session)] == [
        "enviado",
        "pendiente",
        "incierto",
        "incierto",
    ]
    mixed = run_worker(env, "resolve", "--id", str(reset), "--older-than-minutes", "5", "--sent")
    assert mixed.returncode == 2 and "--older-than-minutes" in mixed.stderr


def test_status_and_audit_list_unresolved_incierto_oldest_first(db_url: str, tmp_path: Path) -> None:
    ids = seed(db_url, 12)
    execute(
        db_url,
        "UPDATE cola_envios SET estado = 'incierto', error_codigo = 'timeout', "
        "error_texto = 'read timed out'",
    )
    oldest = ids[7]
    _make_older(db_url, oldest, dt.timedelta(hours=3))
    env = worker_env(db_url, tmp_path)
    status = run_worker(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)["incierto"]
    assert data["count"] == 12 and len(data["oldest"]) == 10
    first = data["oldest"][0]
    assert first["id"] == oldest and first["age_seconds"] >= 3 * 3600 - 60
    assert first["error_code"] == "timeout" and first["error_text"] == "read timed out"
    text = run_worker(env, "status", "--session", "s1")
    assert text.returncode == 0, text.stderr
    assert "incierto waiting for an operator (`cola-worker resolve`): 12, the oldest 10" in text.stdout
    assert f"id {oldest} (session" in text.stdout and "timeout: read timed out" in text.stdout

    code, report = _audit(db_url, tmp_path)
    assert code == 0 and report["incierto_waiting_for_operator"] == 12
    assert report["incierto_oldest"][0]["id"] == oldest
    audit_text = run_worker(env, "audit")
    assert f"id {oldest} (session" in audit_text.stdout

    run_worker(env, "resolve", "--session", "s1", "--not-sent")
    assert json.loads(run_worker(env, "status", "--json").stdout)["incierto"] == {"count": 0, "oldest": []}
    assert "incierto waiting for an operator (`" not in run_worker(env, "status").stdout


def test_a_manual_settlement_is_not_a_second_acceptance(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    # The journal holds the run's own 'accepted' answer, yet the row ended
    # incierto (its state write was lost; by hand here). Settling it by hand
    # adds a manual 'accepted' row: the audit must not call that a duplicate.
    [job] = seed(db_url, 1, start=1)
    _run(db_url, tmp_path, sandbox)
    assert [j["resultado"] for j in _journal(db_url, job)] == ["accepted"]
    execute(db_url, "DELETE FROM envios_whatsapp WHERE cola_envio_id = :i", i=job)
    execute(db_url, "UPDATE cola_envios SET estado = 'incierto' WHERE id = :i", i=job)
    proc = run_worker(worker_env(db_url, tmp_path), "resolve", "--id", str(job), "--sent")
    assert proc.returncode == 0, proc.stderr
    assert [j["resultado"] for j in _journal(db_url, job)] == ["accepted", "accepted"]
    code, report = _audit(db_url, tmp_path)
    assert code == 0 and report["accepted_more_than_once"] == [], report
    # A real second acceptance is still found.
    execute(
        db_url,
        "INSERT INTO intentos_envio (cola_envio_id, inicio_at, fin_at, resultado) "
        "SELECT cola_envio_id, inicio_at, fin_at, resultado FROM intentos_envio "
        "WHERE cola_envio_id = :i AND origen IS NULL",
        i=job,
    )
    code, report = _audit(db_url, tmp_path)
    assert code == 5 and report["accepted_more_than_once"] == [{"job": str(job), "accepted": 2}]


def test_resolve_writes_nothing_when_a_row_is_settled_meanwhile(db_url: str, engine: sa.Engine) -> None:
    """`resolve --id A --id B --sent`: both are incierto when resolve looks; a
    receipt settles B before resolve writes. The conditional UPDATE does not
    take B, so resolve refuses whole: A stays incierto, no ledger or journal row."""
    from test_operator import Interleave

    from worker import resolve
    from worker.errors import UsageError

    [a, b] = seed(db_url, 2)
    execute(db_url, "UPDATE cola_envios SET estado = 'incierto'")
    race = Interleave(
        engine,
        db_url,
        ("UPDATE COLA_ENVIOS",),
        "UPDATE cola_envios SET estado = 'enviado' WHERE id = :i AND estado = 'incierto'",
        i=b,
    )
    args = argparse.Namespace(
        ids=[a, b],
        session=None,
        sent=True,
        provider_id=None,
        reason=None,
        by=None,
        older_than_minutes=None,
        error_code=None,
    )
    with pytest.raises(UsageError, match="changed state meanwhile; nothing written"):
        resolve.resolve(engine, args)
    race.finish()
    assert race.committed_first
    table = rows(db_url)
    assert table[a]["estado"] == "incierto" and table[b]["estado"] == "enviado"
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio") == 0
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == 0


def test_not_sent_refuses_rows_a_dying_run_left_without_the_duplicate_risk_flag(
    db_url: str, tmp_path: Path
) -> None:
    # A run died with the request on the wire: recovery made the row incierto
    # (run_died). Its answer may be in that host's outcome spool: `--not-sent`
    # would send it again, so it needs the explicit flag.
    [died, reset] = seed(db_url, 2)
    execute(
        db_url,
        "UPDATE cola_envios SET estado = 'incierto', error_codigo = 'run_died', intentos = 1 WHERE id = :i",
        i=died,
    )
    execute(db_url, "UPDATE cola_envios SET estado = 'incierto', intentos = 1 WHERE id = :i", i=reset)
    env = worker_env(db_url, tmp_path)
    refused = run_worker(env, "resolve", "--id", str(died), "--id", str(reset), "--not-sent")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert str(died) in refused.stderr and "--accept-duplicate-risk" in refused.stderr
    assert states(db_url) == Counter({"incierto": 2})  # nothing written, not even the other row
    assert run_worker(env, "resolve", "--id", str(died), "--sent").returncode == 0  # settling as sent is safe
    allowed = run_worker(env, "resolve", "--id", str(reset), "--not-sent")
    assert allowed.returncode == 0, allowed.stderr
    [other] = seed(db_url, 1, session="s2", start=5)
    execute(
        db_url,
        "UPDATE cola_envios SET estado = 'incierto', error_codigo = 'run_died' WHERE id = :i",
        i=other,
    )
    forced = run_worker(env, "resolve", "--id", str(other), "--not-sent", "--accept-duplicate-risk")
    assert forced.returncode == 0, forced.stderr
    assert rows(db_url)[other]["estado"] == "pendiente"
