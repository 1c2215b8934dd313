"""`cola-worker demo` (what `make demo` runs) tells the whole story and ends well."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fresh_database
from support import PROJECT, states


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--messages", "60", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "nothing was written" in out  # the bad file refused whole
    assert "inserted 60, already queued 0" in out and "inserted 0, already queued 60" in out
    assert out.count("another run holds the lock") == 2  # two of host A's three runs
    assert "OK: no duplicates" in out
    assert "accepted 60 message(s), duplicates: 0" in out
    assert "Every message was sent exactly once." in out
    ledger = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 60


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_demo_on_a_database_server(backend: str, tmp_path: Path) -> None:
    fresh = fresh_database(backend, tmp_path)
    try:
        demo = [sys.executable, "-m", "worker", "demo", "--messages", "60", "--dir", str(tmp_path)]
        proc = subprocess.run(
            [*demo, "--database-url", fresh.url],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=PROJECT,
        )
        out = proc.stdout
        assert proc.returncode == 0, out + proc.stderr
        assert f"database: {backend}" in out and "SKIP LOCKED" in out
        assert "inserted 60, already queued 0" in out and "OK: no duplicates" in out
        assert "accepted 60 message(s), duplicates: 0" in out
        assert "Every message was sent exactly once." in out
        assert states(fresh.url)["enviado"] == 60
        # Host A's manual run and host B's run both claimed rows: they really overlapped.
        claimed = [int(m) for m in re.findall(r"ended: claimed (\d+),", out)]
        assert len([c for c in claimed if c > 0]) >= 2, claimed

        again = subprocess.run(
            [sys.executable, "-m", "worker", "demo", "--dir", str(tmp_path), "--database-url", fresh.url],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=PROJECT,
        )
        assert again.returncode == 2 and "--database-url" in again.stderr and "not empty" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        fresh.drop()


def test_make_demo_installs_the_package_not_the_development_tools(tmp_path: Path) -> None:
    plan = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], capture_output=True, text=True, cwd=PROJECT
    )
    assert plan.returncode == 0, plan.stderr
    installs = [line for line in plan.stdout.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("[dev]" not in line for line in installs), plan.stdout
    with_url = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}", "DATABASE_URL=mysql+pymysql://u@h/empty"],
        capture_output=True,
        text=True,
        cwd=PROJECT,
    )
    assert "demo --database-url 'mysql+pymysql://u@h/empty'" in with_url.stdout
