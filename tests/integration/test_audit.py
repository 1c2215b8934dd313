"""`cola-worker audit`: the duplicate audit and consistency checks (exit 5)."""

from __future__ import annotations

import json
from pathlib import Path

from support import execute, run_worker, seed, worker_env

from worker.sandbox import SandboxOptions, SandboxServer


def _send_all(url: str, tmp_path: Path) -> None:
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    try:
        proc = run_worker(worker_env(url, tmp_path, provider="fake", fake_base_url=server.base_url), "run")
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop()


def _audit(url: str, tmp_path: Path) -> tuple[int, dict[str, object]]:
    proc = run_worker(worker_env(url, tmp_path), "audit", "--json")
    return proc.returncode, json.loads(proc.stdout)


def test_clean_queue_passes(db_url: str, tmp_path: Path) -> None:
    seed(db_url, 3)
    _send_all(db_url, tmp_path)
    code, report = _audit(db_url, tmp_path)
    assert code == 0 and report["ok"] is True and report["problems"] == 0


def test_same_content_twice_to_one_customer_is_found(db_url: str, tmp_path: Path) -> None:
    # The incident's shape: the same reminder queued twice under different keys, both sent.
    ids = seed(db_url, 2, recipients=["+51900000001"], text="recordatorio")
    execute(db_url, "UPDATE cola_envios SET cliente_id = '+51900000001', payload = '{\"text\": \"same\"}'")
    _send_all(db_url, tmp_path)
    code, report = _audit(db_url, tmp_path)
    assert code == 5
    [by_customer] = report["duplicates_by_customer"]  # type: ignore[misc]
    assert by_customer["cliente_id"] == "+51*****0001"  # masked: the id is a phone number
    assert sorted(by_customer["jobs"]) == sorted(str(i) for i in ids)
    [by_recipient] = report["duplicates_by_recipient"]  # type: ignore[misc]
    assert by_recipient["telefono"] == "+51*****0001" and by_recipient["messages"] == 2
    text = run_worker(worker_env(db_url, tmp_path), "audit")
    assert text.returncode == 5 and "FOUND" in text.stdout and "900000001" not in text.stdout


def test_a_job_accepted_twice_and_inconsistencies_are_found(db_url: str, tmp_path: Path) -> None:
    [sent, never] = seed(db_url, 2)
    _send_all(db_url, tmp_path)
    execute(
        db_url,
        "INSERT INTO intentos_envio (cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado) "
        "SELECT cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado FROM intentos_envio "
        "WHERE cola_envio_id = :i",
        i=sent,
    )
    execute(db_url, "DELETE FROM envios_whatsapp WHERE cola_envio_id = :i", i=never)
    code, report = _audit(db_url, tmp_path)
    assert code == 5
    assert report["accepted_more_than_once"] == [{"job": str(sent), "accepted": 2}]
    assert report["enviado_without_envios_whatsapp"] == [str(never)]


def test_one_acceptance_journaled_twice_is_not_a_duplicate(db_url: str, tmp_path: Path) -> None:
    # A delivery receipt settled an incierto row, then the outcome spool replayed the
    # same answer: two 'accepted' journal rows with one provider message id. One send.
    [job, twice] = seed(db_url, 2)
    _send_all(db_url, tmp_path)
    for row in (job, twice):
        execute(
            db_url,
            "INSERT INTO intentos_envio (cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado, "
            "proveedor_msg_id, origen) SELECT cola_envio_id, ejecucion_id, inicio_at, fin_at, resultado, "
            + ("proveedor_msg_id" if row == job else "'wamid.another'")
            + ", 'receipt' FROM intentos_envio WHERE cola_envio_id = :i",
            i=row,
        )
    code, report = _audit(db_url, tmp_path)
    # The same message id twice is one acceptance; another message id is a second send.
    assert report["accepted_more_than_once"] == [{"job": str(twice), "accepted": 2}], report
    assert code == 5
