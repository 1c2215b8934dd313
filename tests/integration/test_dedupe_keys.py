"""Dedupe keys and claim tokens compare byte for byte on every backend
(migration 0002 makes both columns utf8mb4_bin on MariaDB/MySQL, whose
default collation ignores case and accents)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from support import execute, phone, rows, run_worker, seed, worker_env

from worker.queue import QueueRepository


def _enqueue(env: dict[str, str], to: str, key: str) -> str:
    proc = run_worker(env, "enqueue", "--session", "s", "--to", to, "--text", f"hola {key}", "--key", key)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_keys_that_differ_only_in_case_or_accent_are_two_messages(db_url: str, tmp_path: Path) -> None:
    env = worker_env(db_url, tmp_path)
    assert "inserted 1, already queued 0" in _enqueue(env, phone(1), "Cita-A")
    assert "inserted 1, already queued 0" in _enqueue(env, phone(2), "cita-a")
    assert "inserted 1, already queued 0" in _enqueue(env, phone(3), "cita-á")
    assert "inserted 0, already queued 1" in _enqueue(env, phone(1), "Cita-A")  # the same key: once
    # The kept keys of pruned rows compare exactly too.
    execute(db_url, "INSERT INTO claves_podadas (clave, podada_at) VALUES ('Cita-B', '2026-01-01 00:00:00')")
    assert "inserted 1, already queued 0" in _enqueue(env, phone(4), "cita-b")
    assert "inserted 0, already queued 1" in _enqueue(env, phone(5), "Cita-B")
    by_key = {r["clave"]: r["telefono"] for r in rows(db_url).values()}
    assert by_key == {"Cita-A": phone(1), "cita-a": phone(2), "cita-á": phone(3), "cita-b": phone(4)}


def test_one_input_with_keys_that_differ_only_in_case(db_url: str, tmp_path: Path) -> None:
    """The importer's own dedupe (a key twice in one input) is exact as well:
    `Key` and `key` are two messages, not a conflict; `Key` twice is a repeat."""
    source = tmp_path / "in.csv"
    source.write_text(
        f"telefono,mensaje,clave\n{phone(1)},uno,Key\n{phone(2)},dos,key\n{phone(1)},uno,Key\n",
        encoding="utf-8",
    )
    proc = run_worker(worker_env(db_url, tmp_path), "enqueue", "--session", "s", "--csv", str(source))
    assert proc.returncode == 0, proc.stderr
    assert "inserted 2, already queued 1, invalid 0" in proc.stdout
    assert sorted(r["clave"] for r in rows(db_url).values()) == ["Key", "key"]


def test_a_claim_token_that_differs_only_in_case_matches_no_conditional_write(
    db_url: str, engine: sa.Engine
) -> None:
    [row_id] = seed(db_url, 1)
    token = "abcdef0123456789abcdef0123456789"
    execute(
        db_url,
        "UPDATE cola_envios SET estado = 'procesando', claim_token = :t WHERE id = :i",
        t=token,
        i=row_id,
    )
    repo = QueueRepository(engine)
    assert repo.fence([(row_id, token.upper())]) == (set(), set())
    assert repo.release(token.upper(), [row_id]) == 0
    assert rows(db_url)[row_id]["estado"] == "procesando" and rows(db_url)[row_id]["claim_token"] == token
    assert repo.fence([(row_id, token)]) == ({row_id}, set())  # the exact token does
    assert rows(db_url)[row_id]["estado"] == "enviando"
