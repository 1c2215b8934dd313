"""Enqueue inputs that must never lose a message in silence (G6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import run_worker, states, worker_env

import worker
from worker.errors import InputError


def test_skip_invalid_never_drops_the_rest_of_a_file_in_silence(sqlite_db_url: str, tmp_path: Path) -> None:
    csv_file = tmp_path / "in.csv"
    csv_file.write_text(
        'telefono,mensaje\n+51987654321,uno\n+51987654322,"dos"x\n+51987654323,tres\n+51987654324,cuatro\n'
    )
    env = worker_env(sqlite_db_url, tmp_path)
    proc = run_worker(env, "enqueue", "--session", "s", "--csv", str(csv_file), "--skip-invalid", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    fields = {(e["line"], e["field"]) for e in out["invalid"]}
    assert (3, "(row)") in fields and (3, "(rest of file)") in fields
    refused = run_worker(env, "enqueue", "--session", "s2", "--csv", str(csv_file))
    assert refused.returncode == 2 and "rest of file" in refused.stderr


def test_oversized_template_parameters_are_named_not_crashed(db_url: str) -> None:
    huge = {"telefono": "+51987654321", "plantilla": "t", "idioma": "es", "parametros": ["x" * 70_000]}
    with pytest.raises(InputError, match=r"line 1: parametros: .*longer than 1024"):
        worker.enqueue("s", [huge], database_url=db_url)
    many = {"telefono": "+51987654321", "plantilla": "t", "idioma": "es", "parametros": ["y" * 1000] * 61}
    with pytest.raises(InputError, match=r"line 1: parametros: the message is too large"):
        worker.enqueue("s", [many], database_url=db_url)
    assert states(db_url) == {}


def test_a_key_reused_for_a_different_message_is_refused(db_url: str) -> None:
    a = {"telefono": "+51987654321", "mensaje": "uno", "clave": "K1"}
    b = {"telefono": "+51987654321", "mensaje": "otro", "clave": "K1"}
    with pytest.raises(InputError, match=r"line 2: clave: already used on line 1 for a different message"):
        worker.enqueue("s", [a, b], database_url=db_url)
    assert states(db_url) == {}
    result = worker.enqueue("s", [a, b], database_url=db_url, skip_invalid=True)
    assert (result.inserted, result.already_queued) == (1, 0)
    assert [(e.line, e.field) for e in result.invalid] == [(2, "clave")]
    # A key already in the table names that message (documented: a re-export
    # whose text changed must not send it twice): already queued, not invalid.
    again = worker.enqueue("s", [b], database_url=db_url)
    assert (again.inserted, again.already_queued, again.invalid) == (0, 1, [])
    assert states(db_url) == {"pendiente": 1}
