"""``cola-worker show``: why one row is where it is, without writing SQL.

``show --id N`` prints the row (state, attempts, schedule, owner, provider id,
last error) and its history: the journal (``intentos_envio``), one line per
provider call or settlement, with outcome, HTTP status, provider code, latency
and where it came from (the run, the outcome spool, an operator). ``show
--session NAME --state STATE`` lists the rows of a session in one state with
their last error. Phone numbers are masked; message bodies are never shown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from worker import db
from worker.errors import InputError
from worker.masking import mask_customer_id, mask_phone
from worker.schema import STATES, cola_envios, intentos_envio, sesiones_envio
from worker.settings import Settings

c = cola_envios.c
i = intentos_envio.c


def _iso(value: dt.datetime | None) -> str | None:
    return value.replace(tzinfo=dt.UTC).isoformat() if value is not None else None


def _what(tipo: str, payload: str) -> str:
    """The kind of message (the template's name, never a body)."""
    if tipo != "template":
        return "text"
    try:
        data = json.loads(payload)
    except ValueError:
        return "template"
    name, lang = data.get("template") or data.get("name"), data.get("language") or data.get("lang")
    return f"template {name}" + (f" ({lang})" if lang else "")


def row_history(conn: Connection, job_id: int) -> dict[str, Any]:
    row = conn.execute(
        sa.select(cola_envios, sesiones_envio.c.nombre.label("sesion"))
        .join(sesiones_envio, sesiones_envio.c.id == c.sesion_id)
        .where(c.id == job_id)
    ).one_or_none()
    if row is None:
        raise InputError(f"--id: no row with id {job_id}")
    r = row._mapping
    attempts = [
        {
            "started": _iso(a.inicio_at),
            "finished": _iso(a.fin_at),
            "outcome": a.resultado,
            "http_status": a.http_status,
            "code": a.codigo,
            "latency_ms": a.latencia_ms,
            "provider_message_id": a.proveedor_msg_id,
            "run": a.ejecucion_id,
            "source": a.origen or "run",
            "note": a.nota,
        }
        for a in conn.execute(sa.select(intentos_envio).where(i.cola_envio_id == job_id).order_by(i.id))
    ]
    return {
        "id": str(r["id"]),
        "session": r["sesion"],
        "customer": mask_customer_id(r["cliente_id"]),
        "name": r["cliente_nombre"],
        "to": mask_phone(r["telefono"]),
        "sender": r["remitente"],
        "message": _what(r["tipo"], r["payload"]),
        "state": r["estado"],
        "attempts": r["intentos"],
        "max_attempts": r["max_intentos"],
        "next_attempt_at": _iso(r["proximo_intento_at"]),
        "expires_at": _iso(r["enviar_hasta"]),
        "key": r["clave"],
        "run": r["ejecucion_id"],
        "claimed_at": _iso(r["reclamado_at"]),
        "sent_at": _iso(r["enviado_at"]),
        "provider": r["proveedor"],
        "provider_message_id": r["proveedor_msg_id"],
        "error_code": r["error_codigo"],
        "error": r["error_texto"],
        "created_at": _iso(r["creado_at"]),
        "updated_at": _iso(r["actualizado_at"]),
        "history": attempts,
    }


def session_rows(conn: Connection, session: str, state: str | None, limit: int) -> dict[str, Any]:
    sid = conn.execute(
        sa.select(sesiones_envio.c.id).where(sesiones_envio.c.nombre == session)
    ).scalar_one_or_none()
    if sid is None:
        raise InputError(f"--session: no session named {session!r}")
    q = sa.select(
        c.id, c.cliente_id, c.telefono, c.estado, c.intentos, c.error_codigo, c.error_texto, c.actualizado_at
    ).where(c.sesion_id == sid)
    total_q = sa.select(sa.func.count()).select_from(cola_envios).where(c.sesion_id == sid)
    if state is not None:
        q = q.where(c.estado == state)
        total_q = total_q.where(c.estado == state)
    found = [
        {
            "id": str(r.id),
            "customer": mask_customer_id(r.cliente_id),
            "to": mask_phone(r.telefono),
            "state": r.estado,
            "attempts": r.intentos,
            "error_code": r.error_codigo,
            "error": r.error_texto,
            "updated_at": _iso(r.actualizado_at),
        }
        for r in conn.execute(q.order_by(c.id).limit(limit))
    ]
    total = int(conn.execute(total_q).scalar_one())
    return {"session": session, "state": state, "total": total, "shown": len(found), "rows": found}


def _print_row(data: dict[str, Any]) -> None:
    out = sys.stdout.write
    out(f"row {data['id']}  session {data['session']}  {data['state']}\n")
    for label, key in (
        ("customer", "customer"),
        ("to", "to"),
        ("sender", "sender"),
        ("message", "message"),
        ("key", "key"),
        ("created", "created_at"),
        ("next attempt", "next_attempt_at"),
        ("expires", "expires_at"),
        ("claimed", "claimed_at"),
        ("sent", "sent_at"),
        ("provider", "provider"),
        ("provider id", "provider_message_id"),
    ):
        if data[key] is not None:
            out(f"  {label:<13}{data[key]}\n")
    out(f"  {'attempts':<13}{data['attempts']} of {data['max_attempts']}\n")
    if data["error_code"] or data["error"]:
        out(f"  {'last error':<13}{data['error_code'] or ''} {data['error'] or ''}\n")
    out(f"history ({len(data['history'])} journal row(s)):\n")
    for a in data["history"]:
        parts = [a["started"] or "", a["outcome"]]
        if a["http_status"] is not None:
            parts.append(f"HTTP {a['http_status']}")
        if a["code"]:
            parts.append(f"code {a['code']}")
        if a["latency_ms"] is not None:
            parts.append(f"{a['latency_ms']} ms")
        if a["provider_message_id"]:
            parts.append(f"id {a['provider_message_id']}")
        parts.append(f"by {a['source']}" + (f" run {a['run']}" if a["run"] is not None else ""))
        if a["note"]:
            parts.append(a["note"])
        out("  " + "  ".join(parts) + "\n")


def _print_session(data: dict[str, Any]) -> None:
    out = sys.stdout.write
    scope = f" in state {data['state']}" if data["state"] else ""
    out(f"session {data['session']}: {data['total']} row(s){scope}, showing {data['shown']}\n")
    for r in data["rows"]:
        error = f"  {r['error_code'] or ''} {r['error'] or ''}".rstrip()
        out(f"  {r['id']:>8}  {r['state']:<10} {r['to']:<16} attempts {r['attempts']}{error}\n")


def command_show(args: argparse.Namespace, settings: Settings) -> int:
    if args.id is None and not args.session:
        raise InputError("give --id N (one row) or --session NAME (its rows, with --state)")
    if args.id is not None and args.session:
        raise InputError("--id and --session: give one of them")
    if args.state is not None and args.state not in STATES:
        raise InputError(f"--state: {args.state!r} is not one of {', '.join(STATES)}")
    if args.limit < 1:
        raise InputError("--limit: must be 1 or more")
    engine = db.create_engine_from_settings(settings, pool_size=1)
    try:
        db.check_schema(engine)
        with engine.connect() as conn:
            if args.id is not None:
                data = row_history(conn, args.id)
            else:
                data = session_rows(conn, args.session, args.state, args.limit)
    finally:
        engine.dispose()
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.id is not None:
        _print_row(data)
    else:
        _print_session(data)
    return 0
