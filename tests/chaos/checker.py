"""The chaos test's checker: the sandbox's ledger (the truth of what the
provider accepted) against the database (what the worker believes).

Categories (docs/design.md section 2, G2 and G3):

=============  ===========================================================  =========
category       meaning                                                      must be 0
=============  ===========================================================  =========
lost           a row that is not final (``pendiente``, ``procesando``,      yes
               ``enviando``) after the drain
duplicated     a job id the provider accepted more than once                yes
unexpected     an accepted job id that is no row of the table               yes
false-sent     ``enviado`` but not accepted exactly once, or recorded       yes
               with another message id than the one accepted
unflagged      accepted once, but neither ``enviado`` nor ``incierto``      yes
over-flagged   ``incierto`` but never accepted (allowed: counted)           no
incierto       rows left for an operator to settle                          no
=============  ===========================================================  =========

Usable from the tests (:func:`check` on plain data, :func:`check_database`)
and from the command line::

    COLA_DATABASE_URL=... python tests/chaos/checker.py --ledger ledger.jsonl [--json out.json]
    python tests/chaos/checker.py --show bench/results/chaos.json

The database URL comes from the environment only (G7: never a flag).
Exit status: 0 pass, 1 fail, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINAL = frozenset({"enviado", "error", "incierto", "cancelado"})
MUST_BE_ZERO = ("lost", "duplicated", "unexpected", "false_sent", "unflagged")
SHOWN = (*MUST_BE_ZERO, "over_flagged", "incierto")
SAMPLE = 20  # ids listed per category in the report


@dataclass
class Report:
    rows: int = 0
    accepted: int = 0  # ledger entries
    states: dict[str, int] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)  # job id -> times accepted
    unexpected: list[str] = field(default_factory=list)
    false_sent: list[int] = field(default_factory=list)
    unflagged: list[int] = field(default_factory=list)
    over_flagged: list[int] = field(default_factory=list)
    incierto: int = 0

    @property
    def ok(self) -> bool:
        return all(self.count(name) == 0 for name in MUST_BE_ZERO)

    def count(self, name: str) -> int:
        value = getattr(self, name)
        return value if isinstance(value, int) else len(value)

    def figures(self) -> dict[str, int]:
        return {name: self.count(name) for name in SHOWN}

    def as_json(self) -> dict[str, Any]:
        return {
            "pass": self.ok,
            "rows": self.rows,
            "accepted": self.accepted,
            "states": dict(sorted(self.states.items())),
            **self.figures(),
            "ids": {
                "lost": sorted(self.lost)[:SAMPLE],
                "duplicated": dict(sorted(self.duplicated.items())[:SAMPLE]),
                "unexpected": sorted(self.unexpected)[:SAMPLE],
                "false_sent": sorted(self.false_sent)[:SAMPLE],
                "unflagged": sorted(self.unflagged)[:SAMPLE],
                "over_flagged": sorted(self.over_flagged)[:SAMPLE],
            },
        }

    def table(self, title: str = "chaos checker") -> str:
        return format_table(self.as_json(), title)


def format_table(data: Mapping[str, Any], title: str = "chaos checker") -> str:
    """The report as a small text table (from :meth:`Report.as_json`)."""
    lines = [
        f"{title}: {'PASS' if data['pass'] else 'FAIL'}",
        f"  rows {data['rows']}, accepted by the provider {data['accepted']}, "
        + ", ".join(f"{k} {v}" for k, v in data["states"].items()),
        f"  {'category':<14}{'count':>8}  rule",
    ]
    for name in SHOWN:
        rule = "must be 0" if name in MUST_BE_ZERO else "allowed (counted)"
        lines.append(f"  {name.replace('_', '-'):<14}{data[name]:>8}  {rule}")
        ids = data.get("ids", {}).get(name)
        if ids and name in MUST_BE_ZERO:
            lines.append(f"  {'':<14}{'':>8}  ids: {ids}")
    return "\n".join(lines)


def check(ledger: Iterable[Mapping[str, Any]], rows: Mapping[int, Mapping[str, Any]]) -> Report:
    """Compare the ledger's entries (``job_id``, ``message_id``) with the
    table's rows (id -> ``estado``, ``proveedor_msg_id``)."""
    accepted: Counter[str] = Counter()
    message_ids: dict[str, str | None] = {}
    total = 0
    for entry in ledger:
        total += 1
        job = str(entry.get("job_id") or "")
        accepted[job] += 1
        message_ids[job] = entry.get("message_id")
    report = Report(rows=len(rows), accepted=total)
    report.states = dict(Counter(str(r["estado"]) for r in rows.values()))
    known = {str(i) for i in rows}
    report.unexpected = sorted(job for job in accepted if job not in known)
    report.duplicated = {job: n for job, n in sorted(accepted.items()) if n > 1}
    for row_id, row in sorted(rows.items()):
        estado = str(row["estado"])
        times = accepted.get(str(row_id), 0)
        if estado not in FINAL:
            report.lost.append(row_id)
        if estado == "enviado" and (
            times != 1 or row.get("proveedor_msg_id") != message_ids.get(str(row_id))
        ):
            report.false_sent.append(row_id)
        if times == 1 and estado not in ("enviado", "incierto"):
            report.unflagged.append(row_id)
        if estado == "incierto":
            report.incierto += 1
            if times == 0:
                report.over_flagged.append(row_id)
    return report


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The sandbox's JSON Lines ledger; a line that does not parse is an error."""
    entries = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
            entries.append(entry)
    return entries


def read_rows(url: str) -> dict[int, dict[str, Any]]:
    import sqlalchemy as sa

    from worker import db

    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text("SELECT id, estado, proveedor_msg_id FROM cola_envios"))
            return {int(r.id): {"estado": r.estado, "proveedor_msg_id": r.proveedor_msg_id} for r in result}
    finally:
        engine.dispose()


def check_database(ledger_path: Path, url: str) -> Report:
    return check(read_ledger(ledger_path), read_rows(url))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/chaos/checker.py",
        description="Compare the sandbox's ledger with the database (COLA_DATABASE_URL).",
    )
    parser.add_argument("--ledger", type=Path, help="the sandbox's ledger (JSON Lines)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--show", type=Path, help="print a saved report (chaos.json) and exit")
    args = parser.parse_args(argv)
    if args.show:
        try:
            saved = json.loads(args.show.read_text())
        except (OSError, ValueError) as exc:
            print(f"checker: --show: cannot read {args.show}: {exc}", file=sys.stderr)
            return 2
        for name, data in saved.get("scenarios", {}).items():
            print(format_table(data["checker"], f"chaos {name}"))
            print(f"  {data.get('summary', '')}")
        return 0 if all(d["checker"]["pass"] for d in saved.get("scenarios", {}).values()) else 1
    url = os.environ.get("COLA_DATABASE_URL")
    if not args.ledger or not url:
        print("checker: --ledger FILE and COLA_DATABASE_URL are required", file=sys.stderr)
        return 2
    try:
        report = check_database(args.ledger, url)
    except (OSError, ValueError) as exc:
        print(f"checker: --ledger: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
