"""Operator actions: requeue, cancel, pause, resume, recover, prune.

Each action is one transaction (prune: one per small batch) and writes
nothing when it refuses. Each decision and its write are one conditional
statement: what was read before only explains a refusal, it never widens a
write. Requeueing an ``incierto`` row may send a message a second time, so it
needs ``--accept-duplicate-risk``. An action that matches no row says why
(exit 2).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    ENVIADO,
    ERROR,
    INCIERTO,
    PAUSADA,
    PENDIENTE,
    PROCESANDO,
    claves_podadas,
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
# `incierto` is never pruned: the provider may have delivered it, and only an
# operator (or a receipt) settles it.
PRUNABLE = (ENVIADO, ERROR, CANCELADO)
DEFAULT_KEEP_KEYS_DAYS = 365.0


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


def _selection(conn: Connection, args: argparse.Namespace) -> tuple[Any, int | None]:
    """The rows named by --id and/or --session, and the session's id."""
    ids = getattr(args, "ids", None)
    session = getattr(args, "session", None)
    if not ids and not session:
        raise UsageError("give --id ID (repeatable) or --session NAME")
    cond: sa.ColumnElement[bool] = sa.true()
    sid = None
    if ids:
        cond = sa.and_(cond, c.id.in_(ids))
    if session:
        sid = _session_id(conn, session)
        cond = sa.and_(cond, c.sesion_id == sid)
    return cond, sid


def _counts(conn: Connection, cond: Any) -> dict[str, int]:
    rows = conn.execute(
        sa.select(c.estado, sa.func.count()).where(cond).group_by(c.estado).order_by(c.estado)
    )
    return {str(state): int(n) for state, n in rows}


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items()) if counts else "no rows"


class _Explainer:
    """Why the rows an operator named were not matched: read before the
    conditional write (which alone decides), so only ever used for messages."""

    def __init__(
        self, conn: Connection, args: argparse.Namespace, sid: int | None, states: Sequence[str], takes: str
    ) -> None:
        self.args, self.sid, self.states, self.takes = args, sid, tuple(states), takes
        self.found: dict[int, tuple[str, int]] = {}
        self.session_counts: dict[str, int] = {}
        if args.ids:
            rows = conn.execute(sa.select(c.id, c.estado, c.sesion_id).where(c.id.in_(args.ids)))
            self.found = {int(r.id): (str(r.estado), int(r.sesion_id)) for r in rows}
        elif sid is not None:
            self.session_counts = _counts(conn, c.sesion_id == sid)

    def unmatched(self) -> list[str]:
        """One reason per named id that the write could not take."""
        reasons = []
        for row_id in dict.fromkeys(self.args.ids or ()):
            if row_id not in self.found:
                reasons.append(f"id {row_id} not found")
                continue
            state, sid = self.found[row_id]
            if self.sid is not None and sid != self.sid:
                reasons.append(f"id {row_id} is not in session {self.args.session!r}")
            elif state not in self.states:
                reasons.append(f"id {row_id} is {state} ({self.takes})")
        return reasons

    def nothing(self, action: str) -> UsageError:
        if self.args.ids:
            why = "; ".join(self.unmatched()) or "the rows changed state meanwhile"
        else:
            wanted = "/".join(self.states)
            why = (
                f"session {self.args.session!r} has no {wanted} row "
                f"(it has {_describe(self.session_counts)}; {self.takes})"
            )
        return UsageError(f"{action} matched no row: {why}")


def requeue(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """Put rows back to ``pendiente``. Each write is one conditional UPDATE:
    without ``--accept-duplicate-risk`` the UPDATE itself excludes
    ``incierto``, so a row that turns ``incierto`` while this runs is never
    requeued by accident. Refuses (writing nothing) when the selection holds
    ``incierto`` rows and the flag is missing."""
    state = args.state
    if state is not None and state not in REQUEUABLE:
        raise UsageError(f"--state: {state!r} cannot be requeued (only {', '.join(REQUEUABLE)})")

    def tx(conn: Connection) -> dict[str, Any]:
        cond, sid = _selection(conn, args)
        states = (state,) if state else ((ERROR,) if not args.ids else REQUEUABLE)
        if state:
            takes = f"--state {state}"
        elif args.ids:
            takes = "requeue takes " + ", ".join(REQUEUABLE) + "; incierto only with --accept-duplicate-risk"
        else:
            takes = "without --state, requeue --session takes error rows: add --state incierto or cancelado"
        explain = _Explainer(conn, args, sid, states, takes)
        now = db.db_now(conn)

        def write(which: Sequence[str]) -> int:
            return int(
                conn.execute(
                    cola_envios.update()
                    .where(cond, c.estado.in_(which))
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
            )

        safe = [st for st in states if st != INCIERTO]
        requeued = write(safe) if safe else 0
        uncertain = 0
        if INCIERTO in states:
            if args.accept_duplicate_risk:
                uncertain = write([INCIERTO])
            else:
                # Read after our write, in the same transaction: a row that
                # turned incierto meanwhile was not taken, and is reported.
                found = conn.execute(
                    sa.select(sa.func.count()).select_from(cola_envios).where(cond, c.estado == INCIERTO)
                ).scalar_one()
                if found:
                    raise UsageError(
                        f"{found} row(s) are incierto: the provider may already have delivered them, so "
                        "sending again may duplicate. Add --accept-duplicate-risk to requeue them anyway"
                    )
        if requeued + uncertain == 0:
            raise explain.nothing("requeue")
        return {
            "requeued": requeued + uncertain,
            "of_which_incierto": uncertain,
            "not_matched": explain.unmatched(),
        }

    return db.transaction(engine, tx)


def cancel(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """Cancel rows that are not on the wire (one conditional UPDATE); with
    ``--session`` alone, the session too (new imports into it are refused)."""

    def tx(conn: Connection) -> dict[str, Any]:
        cond, sid = _selection(conn, args)
        states = (args.state,) if args.state else CANCELLABLE
        if any(st not in CANCELLABLE for st in states):
            raise UsageError(f"--state: only {', '.join(CANCELLABLE)} rows can be cancelled")
        takes = (
            f"--state {args.state}"
            if args.state
            else "cancel takes " + ", ".join(CANCELLABLE) + "; an enviando row may be on the wire"
        )
        explain = _Explainer(conn, args, sid, states, takes)
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
        session_cancelled = False
        if sid is not None and not args.ids and not args.state:
            session_cancelled = bool(
                conn.execute(
                    sesiones_envio.update()
                    .where(s_.id == sid, s_.estado != CANCELADA)
                    .values(estado=CANCELADA)
                ).rowcount
            )
        if n == 0 and not session_cancelled:
            raise explain.nothing("cancel")
        return {
            "cancelled": int(n),
            "session_cancelled": session_cancelled,
            "not_matched": explain.unmatched(),
        }

    return db.transaction(engine, tx)


def set_session_state(engine: Engine, name: str, state: str) -> str:
    """Pause or resume a session; returns its state before. A cancelled
    session stays cancelled: the UPDATE itself excludes it, so a cancel that
    commits meanwhile is never undone."""

    def tx(conn: Connection) -> str:
        sid = _session_id(conn, name)
        before = conn.execute(sa.select(s_.estado).where(s_.id == sid)).scalar_one()
        n = conn.execute(
            sesiones_envio.update().where(s_.id == sid, s_.estado != CANCELADA).values(estado=state)
        ).rowcount
        if n == 0:
            raise UsageError(f"--session: {name!r} is cancelled; it cannot be paused or resumed")
        return str(before)

    return db.transaction(engine, tx)


# --- prune ---------------------------------------------------------------------


@dataclass
class PruneReport:
    dry_run: bool
    older_than_days: float
    keep_keys_days: float
    rows: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    journal: int = 0  # intentos_envio rows
    ledger: int = 0  # envios_whatsapp rows
    kept_incierto: int = 0
    keys_kept: int = 0  # tombstones written for the pruned rows
    keys_forgotten: int = 0  # tombstones older than keep_keys_days

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _keep_keys(conn: Connection, keys: Sequence[str], now: dt.datetime) -> None:
    """Write the keys into ``claves_podadas``, refreshing ``podada_at`` of a
    key that is already there."""
    if not keys:
        return
    params = [{"clave": key, "podada_at": now} for key in keys]
    dialect = conn.dialect.name
    stmt: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(claves_podadas).on_conflict_do_update(
            index_elements=["clave"], set_={"podada_at": now}
        )
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(claves_podadas).on_conflict_do_update(
            index_elements=["clave"], set_={"podada_at": now}
        )
    else:
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        mysql_stmt = mysql_insert(claves_podadas)
        stmt = mysql_stmt.on_duplicate_key_update(podada_at=mysql_stmt.inserted.podada_at)
    conn.execute(stmt, params)


def prune(
    engine: Engine,
    older_than_days: float,
    batch: int,
    keep_keys_days: float = DEFAULT_KEEP_KEYS_DAYS,
    *,
    dry_run: bool = False,
) -> PruneReport:
    """Delete ``enviado``/``error``/``cancelado`` rows not updated for
    ``older_than_days`` (with their journal and ledger rows), one small
    transaction per ``batch`` rows. ``incierto`` rows are kept. The key of
    every deleted row goes to ``claves_podadas`` in the same transaction, so
    importing the same input again inserts nothing; keys pruned more than
    ``keep_keys_days`` ago are forgotten. ``dry_run`` counts and writes nothing."""
    if older_than_days < 0:
        raise UsageError("--older-than-days must be at least 0")
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    if keep_keys_days < older_than_days:
        raise UsageError(
            f"--keep-keys-days ({keep_keys_days:g}) must be at least --older-than-days "
            f"({older_than_days:g}): the dedupe key of a pruned row must outlive the row"
        )
    report = PruneReport(dry_run=dry_run, older_than_days=older_than_days, keep_keys_days=keep_keys_days)
    with engine.connect() as conn:
        now = db.db_now(conn)
    cutoff = now - dt.timedelta(days=older_than_days)
    horizon = now - dt.timedelta(days=keep_keys_days)
    old = c.actualizado_at < cutoff
    prunable = sa.and_(c.estado.in_(PRUNABLE), old)
    forgettable = claves_podadas.c.podada_at < horizon

    def count(conn: Connection, table: sa.Table, cond: Any) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(cond)).scalar_one())

    with engine.connect() as conn:
        report.kept_incierto = count(conn, cola_envios, sa.and_(c.estado == INCIERTO, old))
        if dry_run:
            report.by_state = _counts(conn, prunable)
            report.rows = sum(report.by_state.values())
            ids = sa.select(c.id).where(prunable)
            report.journal = count(conn, intentos_envio, intentos_envio.c.cola_envio_id.in_(ids))
            report.ledger = count(conn, envios_whatsapp, envios_whatsapp.c.cola_envio_id.in_(ids))
            report.keys_forgotten = count(conn, claves_podadas, forgettable)
            return report

    def rows_tx(conn: Connection) -> tuple[int, dict[str, int], int, int, int]:
        # MariaDB/PostgreSQL: lock the batch, so a requeue or a receipt waits
        # for us (or we skip its rows), and delete exactly the rows locked.
        # SQLite has no row locks: there the DELETE itself, conditional on the
        # same predicate, decides (RETURNING says which rows it took).
        found = conn.execute(
            sa.select(c.id, c.clave, c.estado)
            .where(prunable)
            .order_by(c.id)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        if not found:
            return 0, {}, 0, 0, 0
        ids = [int(r.id) for r in found]
        delete = cola_envios.delete().where(c.id.in_(ids), prunable)
        if conn.dialect.name in ("postgresql", "sqlite"):
            gone = conn.execute(delete.returning(c.id, c.clave, c.estado)).all()
        else:  # MySQL has no DELETE ... RETURNING; the rows are ours (locked)
            deleted = conn.execute(delete).rowcount
            if deleted == len(found):
                gone = list(found)
            else:
                left = set(conn.execute(sa.select(c.id).where(c.id.in_(ids))).scalars())
                gone = [r for r in found if r.id not in left]
        gone_ids = [int(r.id) for r in gone]
        _keep_keys(conn, [str(r.clave) for r in gone], now)
        journal = ledger = 0
        if gone_ids:
            journal = conn.execute(
                intentos_envio.delete().where(intentos_envio.c.cola_envio_id.in_(gone_ids))
            ).rowcount
            ledger = conn.execute(
                envios_whatsapp.delete().where(envios_whatsapp.c.cola_envio_id.in_(gone_ids))
            ).rowcount
        by_state: dict[str, int] = {}
        for r in gone:
            by_state[str(r.estado)] = by_state.get(str(r.estado), 0) + 1
        return len(found), by_state, int(journal), int(ledger), len(gone)

    while True:
        seen, by_state, journal, ledger, deleted = db.transaction(engine, rows_tx)
        report.rows += deleted
        report.keys_kept += deleted
        report.journal += journal
        report.ledger += ledger
        for st, n in by_state.items():
            report.by_state[st] = report.by_state.get(st, 0) + n
        if seen < batch:
            break

    def keys_tx(conn: Connection) -> tuple[int, int]:
        found = list(
            conn.execute(
                sa.select(claves_podadas.c.clave)
                .where(forgettable)
                .order_by(claves_podadas.c.podada_at)
                .limit(batch)
            ).scalars()
        )
        if not found:
            return 0, 0
        n = conn.execute(
            claves_podadas.delete().where(claves_podadas.c.clave.in_(found), forgettable)
        ).rowcount
        return len(found), int(n)

    while True:
        seen, forgotten = db.transaction(engine, keys_tx)
        report.keys_forgotten += forgotten
        if seen < batch:
            break
    logger.info(
        "prune rows=%d journal=%d ledger=%d kept_incierto=%d keys_kept=%d keys_forgotten=%d",
        report.rows,
        report.journal,
        report.ledger,
        report.kept_incierto,
        report.keys_kept,
        report.keys_forgotten,
        extra={"action": "prune"},
    )
    return report


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


def _not_matched(out: dict[str, Any]) -> str:
    return "".join(f"\nnot matched: {reason}" for reason in out["not_matched"])


def command_requeue(args: argparse.Namespace, settings: Settings) -> int:
    out = _with_engine(settings, lambda engine: requeue(engine, args))
    text = f"requeued {out['requeued']} row(s) ({out['of_which_incierto']} incierto)"
    _print(args, out, text + _not_matched(out))
    return 0


def command_cancel(args: argparse.Namespace, settings: Settings) -> int:
    out = _with_engine(settings, lambda engine: cancel(engine, args))
    text = f"cancelled {out['cancelled']} row(s)"
    if out["session_cancelled"]:
        text += f"; session {args.session!r} cancelled"
    _print(args, out, text + _not_matched(out))
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
    rec = _with_engine(settings, lambda engine: QueueRepository(engine).recover())
    out = {"dead_runs": rec.runs, "requeued": rec.requeued, "incierto": rec.uncertain}
    _print(
        args,
        out,
        f"dead runs {rec.runs}: {rec.requeued} row(s) back to pendiente, {rec.uncertain} to incierto",
    )
    return 0


def command_prune(args: argparse.Namespace, settings: Settings) -> int:
    r = _with_engine(
        settings,
        lambda engine: prune(
            engine, args.older_than_days, args.batch, settings.keep_keys_days, dry_run=args.dry_run
        ),
    )
    days, keep = f"{r.older_than_days:g}", f"{r.keep_keys_days:g}"
    would = "would " if r.dry_run else ""
    states = ", ".join(f"{st} {n}" for st, n in sorted(r.by_state.items())) or "none"
    lines = [
        *(["dry run: nothing written"] if r.dry_run else []),
        f"{would}{'prune' if r.dry_run else 'pruned'} {r.rows} finished row(s) older than {days} day(s) "
        f"({states}), with {r.journal} journal row(s) and {r.ledger} ledger row(s)",
        f"kept {r.kept_incierto} incierto row(s) older than {days} day(s) "
        "(unresolved: the provider may have delivered them)",
    ]
    if not r.dry_run:
        lines.append(f"kept {r.keys_kept} dedupe key(s) of pruned rows for {keep} day(s)")
    lines.append(
        f"{would}{'forget' if r.dry_run else 'forgot'} {r.keys_forgotten} dedupe key(s) "
        f"pruned more than {keep} day(s) ago"
    )
    _print(args, r.as_dict(), "\n".join(lines))
    return 0
