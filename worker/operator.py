"""Operator actions: requeue, cancel, pause, resume, recover, prune.

Each action is one transaction (prune: one per small batch) and writes
nothing when it refuses. Requeueing an ``incierto`` row may send a message a
second time, so it needs ``--accept-duplicate-risk``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.errors import UsageError
from worker.queue import QueueRepository
from worker.schema import (
    ACTIVA,
    CANCELADA,
    CANCELADO,
    ERROR,
    FINAL_STATES,
    INCIERTO,
    PAUSADA,
    PENDIENTE,
    PROCESANDO,
    cola_envios,
    envios_whatsapp,
    intentos_envio,
    sesiones_envio,
)
from worker.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")
c = cola_envios.c
s_ = sesiones_envio.c

REQUEUABLE = (ERROR, INCIERTO, CANCELADO)
# `enviando` is not cancellable: the request may be on the wire right now.
CANCELLABLE = (PENDIENTE, PROCESANDO)


def _engine(settings: Settings) -> Engine:
    engine = db.create_engine_from_settings(settings)
    try:
        db.check_schema(engine)
    except Exception:
        engine.dispose()
        raise
    return engine


def _session_id(conn: Connection, name: str) -> int:
    value = conn.execute(sa.select(s_.id).where(s_.nombre == name)).scalar_one_or_none()
    if value is None:
        raise UsageError(f"--session: no session named {name!r}")
    return int(value)


def _selection(conn: Connection, args: argparse.Namespace) -> Any:
    ids = getattr(args, "ids", None)
    session = getattr(args, "session", None)
    if not ids and not session:
        raise UsageError("give --id ID (repeatable) or --session NAME")
    cond: sa.ColumnElement[bool] = sa.true()
    if ids:
        cond = sa.and_(cond, c.id.in_(ids))
    if session:
        cond = sa.and_(cond, c.sesion_id == _session_id(conn, session))
    return cond


def requeue(engine: Engine, args: argparse.Namespace) -> dict[str, int]:
    state = args.state
    if state is not None and state not in REQUEUABLE:
        raise UsageError(f"--state: {state!r} cannot be requeued (only {', '.join(REQUEUABLE)})")

    def tx(conn: Connection) -> dict[str, int]:
        cond = _selection(conn, args)
        states = (state,) if state else ((ERROR,) if not args.ids else REQUEUABLE)
        cond = sa.and_(cond, c.estado.in_(states))
        uncertain = conn.execute(
            sa.select(sa.func.count()).select_from(cola_envios).where(cond, c.estado == INCIERTO)
        ).scalar_one()
        if uncertain and not args.accept_duplicate_risk:
            raise UsageError(
                f"{uncertain} row(s) are incierto: the provider may already have delivered them, so "
                "sending again may duplicate. Add --accept-duplicate-risk to requeue them anyway"
            )
        now = db.db_now(conn)
        n = conn.execute(
            cola_envios.update()
            .where(cond)
            .values(
                estado=PENDIENTE,
                intentos=0,
                proximo_intento_at=now,
                claim_token=None,
                ejecucion_id=None,
                error_codigo=None,
                error_texto=None,
                actualizado_at=now,
            )
        ).rowcount
        return {"requeued": int(n), "of_which_incierto": int(uncertain)}

    return db.transaction(engine, tx)


def cancel(engine: Engine, args: argparse.Namespace) -> dict[str, int]:
    def tx(conn: Connection) -> dict[str, int]:
        cond = _selection(conn, args)
        states = (args.state,) if args.state else CANCELLABLE
        if any(st not in CANCELLABLE for st in states):
            raise UsageError(f"--state: only {', '.join(CANCELLABLE)} rows can be cancelled")
        now = db.db_now(conn)
        n = conn.execute(
            cola_envios.update()
            .where(cond, c.estado.in_(states))
            .values(
                estado=CANCELADO,
                claim_token=None,
                error_codigo="cancelled",
                error_texto="cancelled by an operator",
                actualizado_at=now,
            )
        ).rowcount
        if args.session and not args.ids and not args.state:
            conn.execute(sesiones_envio.update().where(s_.nombre == args.session).values(estado=CANCELADA))
        return {"cancelled": int(n)}

    return db.transaction(engine, tx)


def set_session_state(engine: Engine, name: str, state: str) -> str:
    def tx(conn: Connection) -> str:
        sid = _session_id(conn, name)
        current = conn.execute(sa.select(s_.estado).where(s_.id == sid)).scalar_one()
        if current == CANCELADA:
            raise UsageError(f"--session: {name!r} is cancelled; it cannot be paused or resumed")
        conn.execute(sesiones_envio.update().where(s_.id == sid).values(estado=state))
        return str(current)

    return db.transaction(engine, tx)


def prune(engine: Engine, older_than_days: float, batch: int) -> int:
    if older_than_days < 0:
        raise UsageError("--older-than-days must be at least 0")
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    total = 0
    while True:

        def tx(conn: Connection) -> int:
            cutoff = db.db_now(conn) - dt.timedelta(days=older_than_days)
            ids = [
                int(r[0])
                for r in conn.execute(
                    sa.select(c.id)
                    .where(c.estado.in_(FINAL_STATES), c.actualizado_at < cutoff)
                    .order_by(c.id)
                    .limit(batch)
                )
            ]
            if not ids:
                return 0
            conn.execute(intentos_envio.delete().where(intentos_envio.c.cola_envio_id.in_(ids)))
            conn.execute(envios_whatsapp.delete().where(envios_whatsapp.c.cola_envio_id.in_(ids)))
            conn.execute(cola_envios.delete().where(c.id.in_(ids), c.estado.in_(FINAL_STATES)))
            return len(ids)

        n = db.transaction(engine, tx)
        total += n
        if n < batch:
            return total


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(text)


def _with_engine(settings: Settings, action: Callable[[Engine], T]) -> T:
    engine = _engine(settings)
    try:
        return action(engine)
    finally:
        engine.dispose()


def command_requeue(args: argparse.Namespace, settings: Settings) -> int:
    out = _with_engine(settings, lambda engine: requeue(engine, args))
    _print(args, out, f"requeued {out['requeued']} row(s) ({out['of_which_incierto']} incierto)")
    return 0


def command_cancel(args: argparse.Namespace, settings: Settings) -> int:
    out = _with_engine(settings, lambda engine: cancel(engine, args))
    _print(args, out, f"cancelled {out['cancelled']} row(s)")
    return 0


def _command_session_state(args: argparse.Namespace, settings: Settings, state: str) -> int:
    before = _with_engine(settings, lambda engine: set_session_state(engine, args.session, state))
    print(f"session {args.session!r}: {before} -> {state}")
    return 0


def command_pause(args: argparse.Namespace, settings: Settings) -> int:
    return _command_session_state(args, settings, PAUSADA)


def command_resume(args: argparse.Namespace, settings: Settings) -> int:
    return _command_session_state(args, settings, ACTIVA)


def command_recover(args: argparse.Namespace, settings: Settings) -> int:
    rec = _with_engine(settings, lambda engine: QueueRepository(engine).recover(settings.lease_seconds))
    out = {"dead_runs": rec.runs, "requeued": rec.requeued, "incierto": rec.uncertain}
    _print(
        args,
        out,
        f"dead runs {rec.runs}: {rec.requeued} row(s) back to pendiente, {rec.uncertain} to incierto",
    )
    return 0


def command_prune(args: argparse.Namespace, settings: Settings) -> int:
    n = _with_engine(settings, lambda engine: prune(engine, args.older_than_days, args.batch))
    print(f"pruned {n} finished row(s) older than {args.older_than_days:g} day(s)")
    return 0
