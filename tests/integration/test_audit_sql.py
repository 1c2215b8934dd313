"""The plain-SQL audit (``sql/audit/*.sql``) finds what ``cola-worker audit --json`` finds.

Each file is run as a DBA would run it: piped into the ``mysql`` client, or
given to ``psql -f``, against a database that has a finding of every kind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_database
from support import PROJECT, execute, run_worker, seed, worker_env

from worker import db
from worker.masking import mask_customer_id, mask_phone
from worker.sandbox import SandboxOptions, SandboxServer

AUDIT_DIR = PROJECT / "sql" / "audit"
CHECKS = (
    "01_accepted_more_than_once",
    "02_duplicates_by_customer",
    "03_duplicates_by_recipient",
    "04_enviado_without_envios_whatsapp",
    "05_envios_whatsapp_without_enviado",
    "06_claimed_by_dead_runs",
    "07_incierto_waiting",
)


def audit_file(check: str, backend: str) -> Path:
    """The file a DBA of ``backend`` pastes: the PostgreSQL variant where the dialect differs."""
    variant = AUDIT_DIR / f"{check}.postgresql.sql"
    if backend == "postgresql" and variant.exists():
        return variant
    return AUDIT_DIR / f"{check}.sql"


def run_sql_client(backend: str, url: str, path: Path) -> list[dict[str, str]]:
    """Run one file through the real command-line client; rows as dicts of strings."""
    u = db.parse_url(url)
    if backend == "mysql":
        client = shutil.which("mysql") or shutil.which("mariadb")
        if client is None:
            pytest.fail("the mysql client is not installed (Debian: mariadb-client)")
        cmd = [client, "--batch", "--raw", "-h", u.host or "127.0.0.1", "-P", str(u.port or 3306)]
        cmd += ["-u", u.username or "root"]
        if u.password:
            cmd.append(f"-p{u.password}")
        cmd.append(str(u.database))
        with path.open() as script:
            proc = subprocess.run(cmd, stdin=script, capture_output=True, text=True, timeout=60)
    else:
        client = shutil.which("psql")
        if client is None:
            pytest.fail("the psql client is not installed (Debian: postgresql-client)")
        cmd = [client, "-X", "-q", "-A", "-F", "\t", "-P", "footer=off", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", u.host or "127.0.0.1", "-p", str(u.port or 5432), "-U", u.username or "postgres"]
        cmd += ["-d", str(u.database), "-f", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line]
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def test_every_audit_file_has_a_comment_saying_what_a_row_means() -> None:
    files = sorted(AUDIT_DIR.glob("*.sql"))
    assert {f.name.split(".")[0] for f in files} == set(CHECKS)
    for f in files:
        comment = [line for line in f.read_text().splitlines() if line.startswith("--")]
        assert comment, f"{f.name} has no comment"
        assert "row" in " ".join(comment).lower(), f"{f.name}: the comment must say what a returned row means"


def _findings_of_every_kind(url: str, tmp_path: Path) -> dict[str, int]:
    # Two reminders with the same content to one customer (the incident's shape).
    dup_a, dup_b = seed(url, 2, session="dup", recipients=["+51900000001"], text="recordatorio")
    execute(
        url,
        "UPDATE cola_envios SET cliente_id = 'cliente-7', payload = '{\"text\": \"same\"}' "
        "WHERE id IN (:a, :b)",
        a=dup_a,
        b=dup_b,
    )
    twice, no_ledger, not_sent, settled = seed(url, 4, session="other", start=10)
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    try:
        env = worker_env(url, tmp_path, provider="fake", fake_base_url=server.base_url)
        proc = run_worker(env, "run")
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop()
    # A job accepted twice in the journal; a sent row whose ledger row is gone; a
    # ledger row whose job is no longer 'enviado'.
    execute(
        url,
        "INSERT INTO intentos_envio (cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado) "
        "SELECT cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado FROM intentos_envio "
        "WHERE cola_envio_id = :i",
        i=twice,
    )
    # One acceptance journaled twice (a receipt, then a replayed answer: the same
    # message id) is one send: no finding.
    execute(
        url,
        "INSERT INTO intentos_envio (cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado, "
        "proveedor_msg_id, origen) SELECT cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado, "
        "proveedor_msg_id, 'receipt' FROM intentos_envio WHERE cola_envio_id = :i",
        i=dup_a,
    )
    execute(url, "DELETE FROM envios_whatsapp WHERE cola_envio_id = :i", i=no_ledger)
    execute(url, "UPDATE cola_envios SET estado = 'error' WHERE id = :i", i=not_sent)
    # A row the journal says was accepted but that ended incierto, settled by
    # hand: the manual journal row is not a second acceptance.
    execute(url, "DELETE FROM envios_whatsapp WHERE cola_envio_id = :i", i=settled)
    execute(url, "UPDATE cola_envios SET estado = 'incierto' WHERE id = :i", i=settled)
    resolved = run_worker(worker_env(url, tmp_path), "resolve", "--id", str(settled), "--sent")
    assert resolved.returncode == 0, resolved.stderr
    # A row claimed by a run that does not exist, and two incierto rows.
    orphan, unsure_a, unsure_b = seed(url, 3, session="late", start=20)
    execute(url, "UPDATE cola_envios SET estado = 'procesando', ejecucion_id = 999 WHERE id = :i", i=orphan)
    execute(url, "UPDATE cola_envios SET estado = 'incierto' WHERE id IN (:a, :b)", a=unsure_a, b=unsure_b)
    return {"twice": twice, "no_ledger": no_ledger, "not_sent": not_sent, "orphan": orphan}


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_plain_sql_audit_finds_what_the_command_finds(backend: str, tmp_path: Path) -> None:
    fresh = fresh_database(backend, tmp_path)
    try:
        url = fresh.url
        engine = db.create_engine(url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        ids = _findings_of_every_kind(url, tmp_path)

        proc = run_worker(worker_env(url, tmp_path), "audit", "--json")
        assert proc.returncode == 5, proc.stderr
        report: dict[str, Any] = json.loads(proc.stdout)
        sql = {check: run_sql_client(backend, url, audit_file(check, backend)) for check in CHECKS}

        assert report["accepted_more_than_once"] == [{"job": str(ids["twice"]), "accepted": 2}]
        assert [{"job": r["job"], "accepted": int(r["accepted"])} for r in sql[CHECKS[0]]] == report[
            "accepted_more_than_once"
        ]
        for check, key, column, mask in (
            (CHECKS[1], "duplicates_by_customer", "cliente_id", mask_customer_id),
            (CHECKS[2], "duplicates_by_recipient", "telefono", mask_phone),
        ):
            from_sql = [
                {
                    column: mask(r[column]),
                    "messages": int(r["messages"]),
                    "jobs": sorted(r["jobs"].split(",")),
                }
                for r in sql[check]
            ]
            assert len(report[key]) == 1 and from_sql == report[key], check
        assert (
            [r["job"] for r in sql[CHECKS[3]]]
            == report["enviado_without_envios_whatsapp"]
            == [str(ids["no_ledger"])]
        )
        assert (
            [r["job"] for r in sql[CHECKS[4]]]
            == report["envios_whatsapp_without_enviado"]
            == [str(ids["not_sent"])]
        )
        assert [r["job"] for r in sql[CHECKS[5]]] == report["claimed_by_dead_runs"] == [str(ids["orphan"])]
        assert len(sql[CHECKS[6]]) == report["incierto_waiting_for_operator"] == 2
        assert [r["job"] for r in sql[CHECKS[6]]] == [str(r["id"]) for r in report["incierto_oldest"]]
        assert all(int(r["age_seconds"]) >= 0 for r in sql[CHECKS[6]])

        # A clean database: every query returns nothing, as the command does.
        for table in ("intentos_envio", "envios_whatsapp", "cola_envios"):
            execute(url, f"DELETE FROM {table}")
        clean = run_worker(worker_env(url, tmp_path), "audit", "--json")
        assert clean.returncode == 0, clean.stderr
        for check in CHECKS:
            assert run_sql_client(backend, url, audit_file(check, backend)) == [], check
    finally:
        fresh.drop()
