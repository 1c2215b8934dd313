"""Settling ``incierto`` rows by hand (``cola-worker resolve``), and the list of
the rows still waiting for it (``status`` and ``audit`` show it).

``--sent`` records a send the operator confirmed elsewhere (the provider's
console, the recipient): the row becomes ``enviado``, with its
``envios_whatsapp`` row and a journal row (``resultado='accepted'``,
``origen='manual'``, ``nota`` = who and why). Nothing is sent. ``--not-sent``
puts the row back to ``pendiente`` (attempts kept, due now), with a journal row
``resultado='not_sent'``.

One transaction. The write is one UPDATE conditional on ``estado='incierto'``;
what was read before only names the rows and explains a refusal. When the
UPDATE does not take every named row (one changed state meanwhile), nothing is
written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.errors import UsageError
from worker.queue import RUN_DIED
from worker.schema import ENVIADO, INCIERTO, PENDIENTE, cola_envios, envios_whatsapp, intentos_envio
from worker.settings import Settings

c = cola_envios.c
MANUAL = "manual"
NOT_SENT = "not_sent"
ACCEPTED = "accepted"
NOTE_LEN = 255
MSG_ID_LEN = 128
# How many unresolved incierto rows status and audit list (oldest first).
LIST_FIRST = 10


def unresolved_incierto(
    conn: Connection, now: dt.datetime, *, session_id: int | None = None, first: int = LIST_FIRST
) -> dict[str, Any]:
    """``{"count": N, "oldest": [...]}``: the ``first`` oldest incierto rows
    (by when they became incierto) with their age and the last error."""
    cond: Any = c.estado == INCIERTO
    if session_id is not None:
        cond = sa.and_(cond, c.sesion_id == session_id)
    count = int(conn.execute(sa.select(sa.func.count()).select_from(cola_envios).where(cond)).scalar_one())
    rows = conn.execute(
        sa.select(c.id, c.sesion_id, c.actualizado_at, c.error_codigo, c.error_texto)
        .where(cond)
        .order_by(c.actualizado_at, c.id)
        .limit(first)
    )
    oldest = [
        {
            "id": int(r.id),
            "session_id": int(r.sesion_id),
            "age_seconds": max(0.0, round((now - r.actualizado_at).total_seconds(), 3)),
            "error_code": r.error_codigo,
            "error_text": r.error_texto,
        }
        for r in rows
    ]
    return {"count": count, "oldest": oldest}


def incierto_lines(data: dict[str, Any]) -> list[str]:
    """Text lines for ``unresolved_incierto``'s result (empty when there is none)."""
    from worker.status import fmt_age  # status renders these lines (and imports this module)

    if not data["count"]:
        return []
    shown = len(data["oldest"])
    more = f", the oldest {shown}" if shown < data["count"] else ""
    lines = [f"incierto waiting for an operator (`cola-worker resolve`): {data['count']}{more}:"]
    for r in data["oldest"]:
        why = r["error_code"] or "?"
        if r["error_text"]:
            why += f": {r['error_text'][:80]}"
        lines.append(f"  id {r['id']} (session {r['session_id']}) for {fmt_age(r['age_seconds'])}: {why}")
    return lines


def _note(args: argparse.Namespace) -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (e.g. a container uid)
        user = "unknown"
    who = user + (f" as {args.by}" if args.by else "")
    note = f"resolved by hand by {who}" + (f": {args.reason}" if args.reason else "")
    return note if len(note) <= NOTE_LEN else note[: NOTE_LEN - 1] + "…"


def _named_rows(conn: Connection, args: argparse.Namespace, now: dt.datetime) -> list[Any]:
    """The rows the operator named; refuses (UsageError) any that is not incierto."""
    if not args.ids and not args.session:
        raise UsageError("give --id ID (repeatable) or --session NAME")
    if args.ids and (args.older_than_minutes is not None or args.error_code is not None):
        raise UsageError("--older-than-minutes/--error-code filter a --session, not --id rows")
    if args.older_than_minutes is not None and args.older_than_minutes < 0:
        raise UsageError("--older-than-minutes must be at least 0")
    cond: Any = sa.true()
    sid = None
    if args.session:
        from worker.schema import sesiones_envio

        sid = conn.execute(
            sa.select(sesiones_envio.c.id).where(sesiones_envio.c.nombre == args.session)
        ).scalar_one_or_none()
        if sid is None:
            raise UsageError(f"--session: no session named {args.session!r}")
        cond = sa.and_(cond, c.sesion_id == sid)
    cols = (c.id, c.estado, c.sesion_id, c.cliente_id, c.telefono, c.proveedor, c.error_codigo)
    if args.ids:
        ids = list(dict.fromkeys(args.ids))
        found = {int(r.id): r for r in conn.execute(sa.select(*cols).where(c.id.in_(ids)))}
        bad = []
        for row_id in ids:
            row = found.get(row_id)
            if row is None:
                bad.append(f"id {row_id} not found")
            elif sid is not None and row.sesion_id != sid:
                bad.append(f"id {row_id} is not in session {args.session!r}")
            elif row.estado != INCIERTO:
                bad.append(f"id {row_id} is {row.estado}")
        if bad:
            raise UsageError("resolve takes only incierto rows: " + "; ".join(bad) + "; nothing written")
        return [found[i] for i in ids]
    cond = sa.and_(cond, c.estado == INCIERTO)
    if args.older_than_minutes is not None:
        cond = sa.and_(cond, c.actualizado_at <= now - dt.timedelta(minutes=args.older_than_minutes))
    if args.error_code is not None:
        cond = sa.and_(cond, c.error_codigo == args.error_code)
    selected = list(conn.execute(sa.select(*cols).where(cond).order_by(c.id)))
    if not selected:
        filters = [
            f"--older-than-minutes {args.older_than_minutes:g}"
            if args.older_than_minutes is not None
            else "",
            f"--error-code {args.error_code}" if args.error_code is not None else "",
        ]
        shown = " ".join(f for f in filters if f)
        raise UsageError(
            f"resolve matched no row: session {args.session!r} has no incierto row"
            + (f" matching {shown}" if shown else "")
        )
    return selected


def resolve(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """Settle the named incierto rows (``args.sent`` or not); all or nothing."""
    if args.provider_id is not None and not args.sent:
        raise UsageError("--provider-id goes with --sent")
    if args.provider_id is not None and not (0 < len(args.provider_id) <= MSG_ID_LEN):
        raise UsageError(f"--provider-id: 1 to {MSG_ID_LEN} characters")
    note = _note(args)

    def tx(conn: Connection) -> dict[str, Any]:
        now = db.db_now(conn)
        named = _named_rows(conn, args, now)
        ids = [int(r.id) for r in named]
        died = [int(r.id) for r in named if r.error_codigo == RUN_DIED]
        if not args.sent and died and not getattr(args, "accept_duplicate_risk", False):
            # The provider may have accepted it, and the answer may still sit in the
            # outcome spool of the dead run's host (replayed by that host's next run).
            raise UsageError(
                f"row(s) {', '.join(map(str, died))} were left incierto by a run that died with the "
                "request on the wire: the provider may have accepted them, and the answer may still be "
                "in that host's outcome spool (its next run replays it). Check with the provider, or "
                "wait for that host's next run; --not-sent sends them again only with "
                "--accept-duplicate-risk. Nothing written"
            )
        common = {"claim_token": None, "ejecucion_id": None, "actualizado_at": now}
        if args.sent:
            values = {
                **common,
                "estado": ENVIADO,
                "enviado_at": now,
                "proveedor_msg_id": args.provider_id,
                "error_codigo": None,
                "error_texto": None,
            }
        else:
            values = {**common, "estado": PENDIENTE, "proximo_intento_at": now}
        taken = conn.execute(
            cola_envios.update().where(c.id.in_(ids), c.estado == INCIERTO).values(**values)
        ).rowcount
        if taken != len(ids):
            # Another process settled some of them meanwhile: write nothing.
            raise UsageError(
                f"{len(ids) - int(taken)} of the named row(s) changed state meanwhile; nothing written"
            )
        if args.sent:
            conn.execute(
                envios_whatsapp.insert(),
                [
                    {
                        "cola_envio_id": r.id,
                        "sesion_id": r.sesion_id,
                        "cliente_id": r.cliente_id,
                        "telefono": r.telefono,
                        "proveedor": r.proveedor or MANUAL,
                        "proveedor_msg_id": args.provider_id,
                        "fecha_envio": now,
                    }
                    for r in named
                ],
            )
        conn.execute(
            intentos_envio.insert(),
            [
                {
                    "cola_envio_id": row_id,
                    "ejecucion_id": None,
                    "inicio_at": now,
                    "fin_at": now,
                    "resultado": ACCEPTED if args.sent else NOT_SENT,
                    "proveedor_msg_id": args.provider_id,
                    "origen": MANUAL,
                    "nota": note,
                }
                for row_id in ids
            ],
        )
        return {"resolved": ids, "as": ENVIADO if args.sent else PENDIENTE, "note": note}

    return db.transaction(engine, tx)


def command_resolve(args: argparse.Namespace, settings: Settings) -> int:
    engine = db.create_engine_from_settings(settings)
    try:
        db.check_schema(engine)
        result = resolve(engine, args)
    finally:
        engine.dispose()
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        what = "enviado (recorded as sent, nothing sent)" if args.sent else "pendiente (due now)"
        ids = ", ".join(str(i) for i in result["resolved"])
        print(f"resolved {len(result['resolved'])} row(s) as {what}: {ids}")
    return 0
