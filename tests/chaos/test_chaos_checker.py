"""The chaos checker itself, on hand-made ledgers and tables: each category
can fail, and a clean history passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from checker import check, read_ledger
from support import PROJECT, execute, seed

CHECKER = PROJECT / "tests" / "chaos" / "checker.py"


def entry(job: int | str, n: int = 0) -> dict[str, Any]:
    return {"job_id": str(job), "message_id": f"wamid.{job}.{n}"}


def row(estado: str, msg: str | None = None) -> dict[str, Any]:
    return {"estado": estado, "proveedor_msg_id": msg}


def clean() -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Sent, flagged after an accepted send, flagged without one, error, cancelled."""
    ledger = [entry(1), entry(2)]
    rows = {
        1: row("enviado", "wamid.1.0"),
        2: row("incierto"),
        3: row("incierto"),
        4: row("error"),
        5: row("cancelado"),
    }
    return ledger, rows


def test_a_clean_history_passes_and_counts_incierto_and_over_flagged() -> None:
    report = check(*clean())
    assert report.ok
    assert report.figures() == {
        "lost": 0,
        "duplicated": 0,
        "unexpected": 0,
        "false_sent": 0,
        "unflagged": 0,
        "over_flagged": 1,
        "incierto": 2,
    }
    assert report.over_flagged == [3]
    assert report.rows == 5 and report.accepted == 2
    assert report.states == {"enviado": 1, "incierto": 2, "error": 1, "cancelado": 1}


@pytest.mark.parametrize("estado", ["pendiente", "procesando", "enviando"])
def test_a_row_not_final_is_lost(estado: str) -> None:
    ledger, rows = clean()
    rows[6] = row(estado)
    report = check(ledger, rows)
    assert not report.ok
    assert report.lost == [6]


def test_a_job_accepted_twice_is_duplicated_and_its_enviado_is_false() -> None:
    ledger, rows = clean()
    ledger.append(entry(1, 1))
    report = check(ledger, rows)
    assert not report.ok
    assert report.duplicated == {"1": 2}
    assert report.false_sent == [1]


def test_a_duplicate_of_an_incierto_row_is_still_duplicated() -> None:
    ledger, rows = clean()
    ledger.append(entry(2, 1))
    report = check(ledger, rows)
    assert report.duplicated == {"2": 2}
    assert not report.ok


@pytest.mark.parametrize("job", ["99", "", "abc"])
def test_an_accepted_job_that_is_no_row_is_unexpected(job: str) -> None:
    ledger, rows = clean()
    ledger.append({"job_id": job, "message_id": "wamid.x"})
    report = check(ledger, rows)
    assert not report.ok
    assert report.unexpected == [job]


def test_enviado_never_accepted_is_false_sent() -> None:
    ledger, rows = clean()
    rows[6] = row("enviado", "wamid.6.0")
    report = check(ledger, rows)
    assert not report.ok
    assert report.false_sent == [6]


def test_enviado_with_another_message_id_than_the_accepted_one_is_false_sent() -> None:
    ledger, rows = clean()
    rows[1] = row("enviado", "wamid.other")
    report = check(ledger, rows)
    assert report.false_sent == [1]
    assert not report.ok


@pytest.mark.parametrize("estado", ["error", "cancelado", "pendiente"])
def test_accepted_once_but_neither_enviado_nor_incierto_is_unflagged(estado: str) -> None:
    ledger, rows = clean()
    rows[6] = row(estado)
    ledger.append(entry(6))
    report = check(ledger, rows)
    assert not report.ok
    assert report.unflagged == [6]


def test_the_table_names_every_category_and_the_failing_ids() -> None:
    ledger, rows = clean()
    ledger.append(entry(1, 1))
    table = check(ledger, rows).table("chaos x")
    assert table.startswith("chaos x: FAIL")
    for name in ("lost", "duplicated", "unexpected", "false-sent", "unflagged", "over-flagged", "incierto"):
        assert f"  {name} " in table, name
    assert "ids: {'1': 2}" in table
    assert check(*clean()).table().startswith("chaos checker: PASS")


def test_a_ledger_line_that_is_not_json_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(entry(1)) + "\n\n" + '{"job_id": "2", "mess\n')
    with pytest.raises(ValueError, match=r"ledger.jsonl:3"):
        read_ledger(path)


def _cli(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    if url:
        env["COLA_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, str(CHECKER), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_reads_the_ledger_and_the_database(sqlite_db_url: str, tmp_path: Path) -> None:
    ids = seed(sqlite_db_url, 3)
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(json.dumps(entry(i)) + "\n" for i in ids[:2]))
    out = tmp_path / "report.json"
    done = _cli("--ledger", str(ledger), "--json", str(out), url=sqlite_db_url)
    assert done.returncode == 1, done.stderr  # three rows still pendiente, two accepted: unflagged
    assert "chaos checker: FAIL" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["lost"] == 3 and saved["unflagged"] == 2 and saved["pass"] is False
    assert saved["ids"]["unflagged"] == ids[:2]


def test_cli_passes_on_a_clean_history_and_shows_a_saved_report(sqlite_db_url: str, tmp_path: Path) -> None:
    (only,) = seed(sqlite_db_url, 1)
    execute(sqlite_db_url, "UPDATE cola_envios SET estado='enviado', proveedor_msg_id='wamid.m'")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"job_id": str(only), "message_id": "wamid.m"}) + "\n")
    done = _cli("--ledger", str(ledger), url=sqlite_db_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "chaos checker: PASS" in done.stdout

    saved = tmp_path / "chaos.json"
    report = check([{"job_id": str(only), "message_id": "wamid.m"}], {only: row("enviado", "wamid.m")})
    saved.write_text(json.dumps({"scenarios": {"mysql": {"checker": report.as_json(), "summary": "s"}}}))
    shown = _cli("--show", str(saved))
    assert shown.returncode == 0 and "chaos mysql: PASS" in shown.stdout


def test_cli_without_a_database_url_is_bad_usage(tmp_path: Path) -> None:
    done = _cli("--ledger", str(tmp_path / "nothing.jsonl"))
    assert done.returncode == 2
    assert "COLA_DATABASE_URL" in done.stderr
    assert "Traceback" not in done.stderr
