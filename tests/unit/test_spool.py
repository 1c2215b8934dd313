"""The local outcome spool: durable appends, dropped once recorded, a torn
last line skipped, compaction keeps only what is outstanding."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from worker import spool as spool_module
from worker.errors import ConfigError
from worker.queue import Outcome
from worker.spool import OutcomeSpool, SpoolEntry, spool_path

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901)


def _entry(job: int, token: str = "tok") -> SpoolEntry:
    outcome = Outcome("enviado", "accepted", True, message_id=f"wamid.{job}", http_status=200)
    return SpoolEntry(job, token, 7, "meta", T0, 42, 1, outcome)


def test_entries_round_trip_and_are_dropped_once_recorded(tmp_path: Path) -> None:
    path = spool_path(str(tmp_path / "run.lock"))
    assert path.endswith("run.lock.spool")
    sp = OutcomeSpool(path)
    try:
        sp.append([_entry(1), _entry(2)])
        sp.append([_entry(1)])  # already outstanding: not written twice
        lines = Path(path).read_text().splitlines()
        assert len(lines) == 2
        data = json.loads(lines[0])
        assert data["job_id"] == "1" and data["claim_token"] == "tok" and data["kind"] == "accepted"
        assert data["message_id"] == "wamid.1" and data["http_status"] == 200
        assert {e.key: e for e in sp.pending()}[(1, "tok")].started_at == T0
        assert sp.pending()[0].outcome == _entry(1).outcome
        sp.recorded([(1, "tok")])
        assert Path(path).stat().st_size > 0  # entry 2 is still outstanding
        sp.recorded([(2, "tok")])
        assert Path(path).stat().st_size == 0
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    finally:
        sp.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = str(tmp_path / "run.lock.spool")
    Path(path).write_text(_entry(1).to_json() + "\n" + _entry(2).to_json()[:30])
    sp = OutcomeSpool(path)
    try:
        assert [e.job_id for e in sp.pending()] == [1]
        sp.clear()
        assert sp.pending() == []
    finally:
        sp.close()


def test_a_large_spool_is_compacted_to_what_is_outstanding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "COMPACT_BYTES", 2000)
    path = str(tmp_path / "run.lock.spool")
    sp = OutcomeSpool(path)
    try:
        sp.append([_entry(0, "keep")])
        for i in range(1, 40):
            sp.append([_entry(i)])
            sp.recorded([(i, "tok")])
        assert Path(path).stat().st_size < 2000 + 1000
        assert sp.outstanding() == 1
        kept = [e.key for e in sp.pending()]
        assert (0, "keep") in kept and len(kept) < 20  # recorded entries were dropped on the way
        sp.append([_entry(99)])  # still appends to the file on the path
        other = OutcomeSpool(path)
        try:
            assert {0, 99} <= {e.job_id for e in other.pending()}
        finally:
            other.close()
    finally:
        sp.close()


def test_a_symlinked_spool_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "run.lock.spool"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        OutcomeSpool(str(link))


def test_an_entry_whose_text_holds_unicode_line_separators_is_read_back(tmp_path: Path) -> None:
    # A provider's error text may carry U+2028, U+2029 or U+0085: they must not
    # split the entry (str.splitlines would), or the row would end incierto.
    text = "invalid parameter\u2028second line\u2029third\x85fourth"
    outcome = Outcome("error", "permanent", True, code="131009", text=text, http_status=400)
    path = str(tmp_path / "run.lock.spool")
    sp = OutcomeSpool(path)
    try:
        sp.append([SpoolEntry(5, "tok", 7, "meta", T0, 42, 1, outcome), _entry(6)])
    finally:
        sp.close()
    again = OutcomeSpool(path)
    try:
        read = {e.job_id: e for e in again.pending()}
        assert sorted(read) == [5, 6]
        assert read[5].outcome.text == text
    finally:
        again.close()
