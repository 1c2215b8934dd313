"""`cola-worker demo` (what `make demo` runs) tells the whole story and ends well."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import PROJECT


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
