"""The duplicate audit: the check the original incident lacked.

Over a window (default 24 h), it looks for:
- jobs the provider accepted more than once (``intentos_envio``);
- customers, and recipients, who got the same content more than once
  (``envios_whatsapp`` joined to the row's payload);
- inconsistencies: ``enviado`` rows without their ``envios_whatsapp`` row and
  the reverse, rows ``procesando``/``enviando`` owned by a run that is not live.

Exit 5 when anything is found. ``incierto`` rows are reported (a count and
the oldest few, with their age and error), not failed on: they are waiting for
an operator by design. A row settled with ``resolve`` is no finding: its
manual journal row (``origen='manual'``) is not a provider acceptance.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.delivery import incierto_waiting
from worker.errors import AuditFailed
from worker.masking import mask_customer_id, mask_phone
from worker.queue import RUN_ACTIVE
from worker.resolve import incierto_lines, unresolved_incierto
from worker.schema import (
    ENVIADO,
    ENVIANDO,
    PROCESANDO,
    cola_envios,
    ejecuciones,
    envios_whatsapp,
    intentos_envio,
)
from worker.settings import Settings

c = cola_envios.c
w = envios_whatsapp.c
i = intentos_envio.c


# A manual settlement (``resolve --sent``) records a send that happened, or
# not, elsewhere: it is not a second acceptance by the provider.
_from_provider = sa.or_(i.origen.is_(None), i.origen != "manual")
# Distinct provider message ids: one acceptance journaled twice (a delivery
# receipt settled the row, then the outcome spool replayed the same answer) is
# one send; a journal row without an id counts on its own.
_acceptances = sa.func.count(
    sa.distinct(sa.func.coalesce(i.proveedor_msg_id, sa.literal("journal ") + sa.cast(i.id, sa.String)))
)


def run_audit(engine: Engine, hours: float, receipt_window: float = 3600.0) -> dict[str, Any]:
    with engine.connect() as conn:
        now = db.db_now(conn)
        since = now - dt.timedelta(hours=hours)
        accepted_twice = [
            {"job": str(r[0]), "accepted": int(r[1])}
            for r in conn.execute(
                sa.select(i.cola_envio_id, _acceptances)
                .where(i.resultado == "accepted", _from_provider, i.inicio_at >= since)
                .group_by(i.cola_envio_id)
                .having(_acceptances > 1)
            )
        ]
        by_customer = _same_content_twice(conn, engine, w.cliente_id, "cliente_id", mask_customer_id, since)
        by_recipient = _same_content_twice(conn, engine, w.telefono, "telefono", mask_phone, since)
        sent_without_ledger = [
            str(r[0])
            for r in conn.execute(
                sa.select(c.id)
                .select_from(cola_envios.outerjoin(envios_whatsapp, w.cola_envio_id == c.id))
                .where(c.estado == ENVIADO, w.id.is_(None), c.actualizado_at >= since)
            )
        ]
        ledger_without_sent = [
            str(r[0])
            for r in conn.execute(
                sa.select(w.cola_envio_id)
                .select_from(envios_whatsapp.join(cola_envios, c.id == w.cola_envio_id))
                .where(c.estado != ENVIADO, w.fecha_envio >= since)
            )
        ]
        live = sa.select(ejecuciones.c.id).where(ejecuciones.c.estado == RUN_ACTIVE).scalar_subquery()
        orphaned = [
            str(r[0])
            for r in conn.execute(
                sa.select(c.id).where(
                    c.estado.in_((PROCESANDO, ENVIANDO)),
                    sa.or_(c.ejecucion_id.is_(None), c.ejecucion_id.not_in(live)),
                )
            )
        ]
        uncertain = unresolved_incierto(conn, now)
        # Reported, not a problem: no receipt settled them within the window.
        no_receipt = incierto_waiting(conn, now, receipt_window)
    problems = (
        len(accepted_twice)
        + len(by_customer)
        + len(by_recipient)
        + len(sent_without_ledger)
        + len(ledger_without_sent)
        + len(orphaned)
    )
    return {
        "window_hours": hours,
        "since": since.isoformat(),
        "ok": problems == 0,
        "problems": problems,
        "accepted_more_than_once": accepted_twice,
        "duplicates_by_customer": by_customer,
        "duplicates_by_recipient": by_recipient,
        "enviado_without_envios_whatsapp": sent_without_ledger,
        "envios_whatsapp_without_enviado": ledger_without_sent,
        "claimed_by_dead_runs": orphaned,
        "incierto_waiting_for_operator": uncertain["count"],
        "incierto_oldest": uncertain["oldest"],
        "incierto_without_receipt": no_receipt,
    }


def _same_content_twice(
    conn: Connection, engine: Engine, key: Any, name: str, mask: Callable[[str], str], since: dt.datetime
) -> list[dict[str, Any]]:
    """Who (by ``key``) received the same content more than once since ``since``."""
    rows = conn.execute(
        sa.select(key, sa.func.count(), _group_ids(engine, w.cola_envio_id))
        .select_from(envios_whatsapp.join(cola_envios, c.id == w.cola_envio_id))
        .where(w.fecha_envio >= since)
        .group_by(key, c.payload)
        .having(sa.func.count() > 1)
    )
    return [{name: mask(r[0]), "messages": int(r[1]), "jobs": sorted(_ids(r[2]))} for r in rows]


def _group_ids(engine: Engine, col: Any) -> Any:
    if engine.dialect.name == "postgresql":
        return sa.func.string_agg(sa.cast(col, sa.String), ",")
    return sa.func.group_concat(col)


def _ids(value: Any) -> list[str]:
    return [x for x in str(value or "").split(",") if x]


def command_audit(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_engine_from_settings(settings)
    try:
        db.check_schema(engine)
        report = run_audit(engine, args.hours, settings.receipt_window)
    finally:
        engine.dispose()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"audit over the last {args.hours:g} h:")
        for key in (
            "accepted_more_than_once",
            "duplicates_by_customer",
            "duplicates_by_recipient",
            "enviado_without_envios_whatsapp",
            "envios_whatsapp_without_enviado",
            "claimed_by_dead_runs",
        ):
            items = report[key]
            print(f"  {key.replace('_', ' ')}: {len(items)}")
            for item in items[:20]:
                print(f"    {item}")
        print(f"  incierto waiting for an operator: {report['incierto_waiting_for_operator']}")
        for line in incierto_lines(
            {"count": report["incierto_waiting_for_operator"], "oldest": report["incierto_oldest"]}
        )[1:]:
            print(f"  {line}")
        waiting = report["incierto_without_receipt"]
        print(f"  incierto with no receipt after {waiting['window_seconds']:g} s: {waiting['count']}")
        for row in waiting["rows"]:
            print(f"    job {row['id']}: incierto for {row['age_seconds']:.0f} s")
        print(
            "  OK: no duplicates, no inconsistencies"
            if report["ok"]
            else f"  FOUND {report['problems']} problem(s)"
        )
    if not report["ok"]:
        raise AuditFailed(f"audit found {report['problems']} problem(s)")
    return 0
