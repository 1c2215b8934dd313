"""Status: per-session counts by state, the age of the oldest pending row,
live and dead runs, and the lock holder.

Every age is measured by the database's clock (read in the same transaction as
the counts), never by this host's, like the lease itself (docs/design.md section 5).
``collect_status`` is pure data (stable keys, ISO 8601 timestamps in UTC);
``command_status`` renders it as a rich table or as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.delivery import incierto_waiting
from worker.errors import InputError, UsageError
from worker.resolve import incierto_lines, unresolved_incierto
from worker.schema import (
    CANCELADA,
    PAUSADA,
    PENDIENTE,
    STATES,
    cola_envios,
    ejecuciones,
    sesiones_envio,
)
from worker.settings import Settings

logger = logging.getLogger(__name__)


def _iso(value: dt.datetime | None) -> str | None:
    """Naive UTC -> ISO 8601 with an explicit offset."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC).isoformat()


def _age(now: dt.datetime, then: dt.datetime | None) -> float | None:
    if then is None:
        return None
    return round(max(0.0, (now - then).total_seconds()), 3)


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(STATES, 0)


def _collect(conn: Connection, settings: Settings, session: str | None) -> dict[str, Any]:
    now = db.db_now(conn)

    sessions_q = sa.select(
        sesiones_envio.c.id, sesiones_envio.c.nombre, sesiones_envio.c.estado, sesiones_envio.c.creado_at
    ).order_by(sesiones_envio.c.id)
    if session is not None:
        sessions_q = sessions_q.where(sesiones_envio.c.nombre == session)
    session_rows = conn.execute(sessions_q).all()
    if session is not None and not session_rows:
        raise InputError(f"--session: no session named {session!r}")
    ids = [r.id for r in session_rows]

    counts: dict[int, dict[str, int]] = {i: _zero_counts() for i in ids}
    pending: dict[int, tuple[dt.datetime | None, int, dt.datetime | None, dt.datetime | None]] = {}
    if ids:
        by_state = (
            sa.select(cola_envios.c.sesion_id, cola_envios.c.estado, sa.func.count().label("n"))
            .where(cola_envios.c.sesion_id.in_(ids))
            .group_by(cola_envios.c.sesion_id, cola_envios.c.estado)
        )
        for r in conn.execute(by_state):
            counts[r.sesion_id][r.estado] = counts[r.sesion_id].get(r.estado, 0) + int(r.n)
        due = cola_envios.c.proximo_intento_at <= now
        pending_q = (
            sa.select(
                cola_envios.c.sesion_id,
                sa.func.min(cola_envios.c.creado_at).label("oldest"),
                sa.func.sum(sa.case((due, 1), else_=0)).label("due_now"),
                sa.func.min(sa.case((due, cola_envios.c.proximo_intento_at), else_=None)).label("oldest_due"),
                sa.func.min(sa.case((due, None), else_=cola_envios.c.proximo_intento_at)).label("next_due"),
            )
            .where(cola_envios.c.sesion_id.in_(ids), cola_envios.c.estado == PENDIENTE)
            .group_by(cola_envios.c.sesion_id)
        )
        for r in conn.execute(pending_q):
            pending[r.sesion_id] = (
                _as_datetime(r.oldest),
                int(r.due_now or 0),
                _as_datetime(r.oldest_due),
                _as_datetime(r.next_due),
            )

    sessions: list[dict[str, Any]] = []
    totals = _zero_counts()
    total_due = 0
    oldest_all: dt.datetime | None = None
    oldest_due_all: dt.datetime | None = None
    for r in session_rows:
        oldest, due_now, oldest_due, next_due = pending.get(r.id, (None, 0, None, None))
        for state, n in counts[r.id].items():
            totals[state] = totals.get(state, 0) + n
        total_due += due_now
        oldest_all = _min(oldest_all, oldest)
        oldest_due_all = _min(oldest_due_all, oldest_due)
        sessions.append(
            {
                "id": int(r.id),
                "name": r.nombre,
                "state": r.estado,
                "created_at": _iso(r.creado_at),
                "counts": counts[r.id],
                "total": sum(counts[r.id].values()),
                "oldest_pending_age_seconds": _age(now, oldest),
                "due_now": due_now,
                "oldest_due_age_seconds": _age(now, oldest_due),
                "next_due_at": _iso(next_due),
                "not_due_reason": _not_due_reason(r.estado, counts[r.id][PENDIENTE], due_now, now, next_due),
            }
        )

    # Each run is judged by its own lease (as recovery judges it), not by this caller's setting.
    open_runs = conn.execute(
        sa.select(ejecuciones)
        .where(ejecuciones.c.finalizada_at.is_(None))
        .order_by(ejecuciones.c.iniciada_at, ejecuciones.c.id)
    ).all()

    def alive(r: Any) -> bool:
        return bool(r.latido_at >= now - dt.timedelta(seconds=float(r.lease_segundos)))

    live_runs = [
        {
            "id": int(r.id),
            "host": r.host,
            "pid": int(r.pid),
            "mode": r.modo,
            "state": r.estado,
            "started_at": _iso(r.iniciada_at),
            "heartbeat_at": _iso(r.latido_at),
            "heartbeat_age_seconds": _age(now, r.latido_at),
            "lease_seconds": float(r.lease_segundos),
            "counts": {
                "claimed": int(r.reclamados),
                "sent": int(r.enviados),
                "errors": int(r.errores),
                "uncertain": int(r.inciertos),
                "retries": int(r.reintentos),
            },
        }
        for r in open_runs
        if alive(r)
    ]
    dead_runs = sum(1 for r in open_runs if not alive(r))

    return {
        "generated_at": _iso(now),
        "lease_seconds": settings.lease_seconds,
        "sessions": sessions,
        "totals": {
            "counts": totals,
            "total": sum(totals.values()),
            "oldest_pending_age_seconds": _age(now, oldest_all),
            "due_now": total_due,
            "oldest_due_age_seconds": _age(now, oldest_due_all),
        },
        "live_runs": live_runs,
        "dead_runs": int(dead_runs),
        # incierto rows no delivery receipt settled within COLA_RECEIPT_WINDOW, with their age.
        "incierto_without_receipt": incierto_waiting(conn, now, settings.receipt_window),
        "incierto": unresolved_incierto(conn, now, session_id=ids[0] if session is not None else None),
    }


def _not_due_reason(
    session_state: str, pending: int, due_now: int, now: dt.datetime, next_due: dt.datetime | None
) -> str | None:
    """Why a session with pending rows has nothing a run would take now (None: something is due,
    or nothing is pending)."""
    if pending == 0:
        return None
    if session_state == PAUSADA:
        return "session paused (`cola-worker resume --session NAME`)"
    if session_state == CANCELADA:
        return "session cancelled"
    if due_now == 0 and next_due is not None:
        return f"scheduled later: next in {fmt_age((next_due - now).total_seconds())}"
    return None


def _as_datetime(value: Any) -> dt.datetime | None:
    # Aggregates over a CASE lose the column type on some dialects (SQLite returns text).
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def _min(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def collect_status(
    engine: Engine,
    settings: Settings,
    lock_holder: dict[str, Any] | None,
    *,
    session: str | None = None,
) -> dict[str, Any]:
    """The status as plain data (JSON-ready, stable keys). ``lock_holder`` is
    what the CLI read from the lock file (None: nobody holds it / unknown)."""
    try:
        data = db.transaction(engine, lambda conn: _collect(conn, settings, session))
    except sa_exc.DBAPIError as exc:
        translated = db.translate_error(exc)
        if translated is exc:
            raise
        raise translated from exc
    data["lock_holder"] = lock_holder
    return data


# --- rendering --------------------------------------------------------------


def fmt_age(seconds: float | None) -> str:
    """``75`` -> ``75s``, ``4000`` -> ``66m40s``, then hours and days; ``None`` -> ``-``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


# Under this many columns, the tables drop to the columns an operator reads first.
WIDE = 120
# The compact table: the states an operator acts on, the rest summed as "other".
COMPACT_STATES = (PENDIENTE, "enviado", "error", "incierto")


def _compact_sessions(data: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"status at {data['generated_at'][:19]}Z", title_justify="left", pad_edge=False, box=box.SIMPLE
    )
    table.add_column("session", overflow="fold", max_width=18)
    for state in COMPACT_STATES:
        table.add_column(state, justify="right")
    table.add_column("other", justify="right")
    table.add_column("due", justify="right")
    table.add_column("oldest due", justify="right")

    def other(counts: dict[str, int]) -> str:
        return str(sum(n for state, n in counts.items() if state not in COMPACT_STATES))

    for s in data["sessions"]:
        name = s["name"] if s["state"] == "activa" else f"{s['name']} ({s['state']})"
        table.add_row(
            name,
            *(str(s["counts"][state]) for state in COMPACT_STATES),
            other(s["counts"]),
            str(s["due_now"]),
            fmt_age(s["oldest_due_age_seconds"]),
        )
    t = data["totals"]
    table.add_section()
    table.add_row(
        "total",
        *(str(t["counts"][state]) for state in COMPACT_STATES),
        other(t["counts"]),
        str(t["due_now"]),
        fmt_age(t["oldest_due_age_seconds"]),
    )
    return table


def _compact_runs(data: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    runs = Table(
        title=f"live runs (lease {data['lease_seconds']:g}s)",
        title_justify="left",
        pad_edge=False,
        box=box.SIMPLE,
    )
    for name in ("id", "host", "pid", "beat", "claimed", "sent", "err", "unsure"):
        runs.add_column(name, justify="left" if name == "host" else "right", overflow="fold")
    for r in data["live_runs"]:
        c = r["counts"]
        runs.add_row(
            str(r["id"]),
            r["host"][:16],
            str(r["pid"]),
            fmt_age(r["heartbeat_age_seconds"]),
            str(c["claimed"]),
            str(c["sent"]),
            str(c["errors"]),
            str(c["uncertain"]),
        )
    return runs


def _why_nothing_is_due(data: dict[str, Any]) -> list[str]:
    """One line per session whose pending rows a run would not take now."""
    return [
        f"{s['name']}: nothing due: {s['not_due_reason']}" for s in data["sessions"] if s["not_due_reason"]
    ]


def render(data: dict[str, Any], width: int = 160) -> Any:
    """A rich renderable (a group of tables) for a terminal ``width`` columns wide."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if width < WIDE:
        parts: list[Any] = [_compact_sessions(data)]
        parts += [Text(line, style="yellow") for line in _why_nothing_is_due(data)]
        parts.append(_compact_runs(data))
        parts += _footer(data)
        return Group(*parts)

    sessions = Table(title=f"cola-worker status at {data['generated_at']}", title_justify="left")
    sessions.add_column("id", justify="right")
    sessions.add_column("session")
    sessions.add_column("state")
    for state in STATES:
        sessions.add_column(state, justify="right")
    sessions.add_column("due now", justify="right")
    sessions.add_column("oldest pending", justify="right")
    sessions.add_column("oldest due", justify="right")
    for s in data["sessions"]:
        sessions.add_row(
            str(s["id"]),
            s["name"],
            s["state"],
            *(str(s["counts"][state]) for state in STATES),
            str(s["due_now"]),
            fmt_age(s["oldest_pending_age_seconds"]),
            fmt_age(s["oldest_due_age_seconds"]),
        )
    t = data["totals"]
    sessions.add_section()
    sessions.add_row(
        "",
        "total",
        "",
        *(str(t["counts"][state]) for state in STATES),
        str(t["due_now"]),
        fmt_age(t["oldest_pending_age_seconds"]),
        fmt_age(t["oldest_due_age_seconds"]),
    )

    runs = Table(title=f"live runs (heartbeat within {data['lease_seconds']:g}s)", title_justify="left")
    for name in (
        "id",
        "host",
        "pid",
        "mode",
        "started",
        "heartbeat age",
        "claimed",
        "sent",
        "errors",
        "uncertain",
    ):
        runs.add_column(name, justify="right" if name not in ("host", "mode", "started") else "left")
    for r in data["live_runs"]:
        c = r["counts"]
        runs.add_row(
            str(r["id"]),
            r["host"],
            str(r["pid"]),
            r["mode"],
            r["started_at"],
            fmt_age(r["heartbeat_age_seconds"]),
            str(c["claimed"]),
            str(c["sent"]),
            str(c["errors"]),
            str(c["uncertain"]),
        )

    return Group(
        sessions,
        *(Text(line, style="yellow") for line in _why_nothing_is_due(data)),
        runs,
        *_footer(data),
    )


def _footer(data: dict[str, Any]) -> list[Any]:
    from rich.text import Text

    parts: list[Any] = [Text(line, style="yellow") for line in incierto_lines(data["incierto"])]
    dead = data["dead_runs"]
    if dead:
        parts.append(
            Text(
                f"{dead} run(s) silent past the lease and not finished: `cola-worker recover` "
                "(every run also recovers first)",
                style="bold red",
            )
        )
    else:
        parts.append(Text("dead runs: 0"))
    waiting = data.get("incierto_without_receipt")
    if waiting and waiting["count"]:
        ages = ", ".join(f"#{r['id']} {fmt_age(r['age_seconds'])}" for r in waiting["rows"][:5])
        parts.append(
            Text(
                f"incierto with no receipt after {fmt_age(waiting['window_seconds'])}: {waiting['count']} "
                f"(oldest {fmt_age(waiting['oldest_age_seconds'])}; {ages})",
                style="yellow",
            )
        )
    holder = data.get("lock_holder")
    if holder:
        parts.append(Text("lock holder: " + ", ".join(f"{k}={v}" for k, v in holder.items())))
    else:
        parts.append(Text("lock holder: none"))
    return parts


def read_lock_holder(settings: Settings) -> dict[str, Any] | None:
    """Who holds this host's file lock (pid, host, started), or None."""
    from worker import lock

    try:
        held, holder = lock.status(settings.lock_file)
    except (OSError, UsageError) as exc:
        logger.warning("cannot read the lock file %s: %s", settings.lock_file, exc)
        return None
    if not held:
        return None
    return holder.as_dict() if holder is not None else {"pid": None, "host": None, "started": None}


def command_status(args: argparse.Namespace, settings: Settings) -> int:
    """``cola-worker status [--session NAME] [--json] [--watch N]``.

    ``--watch N`` refreshes every N seconds until Ctrl-C (with ``--json``: one
    JSON object per line). The lock holder is ``args.lock_holder`` when the CLI
    set it, else it is read from the lock file."""
    session: str | None = getattr(args, "session", None)
    as_json = bool(getattr(args, "json", False))
    watch: float | None = getattr(args, "watch", None)
    lock_holder: dict[str, Any] | None = getattr(args, "lock_holder", None)
    if lock_holder is None:
        lock_holder = read_lock_holder(settings)
    if watch is not None and watch <= 0:
        raise InputError("--watch: the refresh interval must be more than 0 seconds")

    engine = db.create_engine_from_settings(settings, pool_size=1)
    try:
        db.check_schema(engine)

        def snapshot() -> dict[str, Any]:
            return collect_status(engine, settings, lock_holder, session=session)

        if as_json:
            print(json.dumps(snapshot()), flush=True)
            if watch is not None:
                try:
                    while True:
                        time.sleep(watch)
                        print(json.dumps(snapshot()), flush=True)
                except KeyboardInterrupt:
                    pass
            return 0

        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped or under cron: do not squeeze the table into 80 columns
            console = Console(width=160)
        width = console.width
        if watch is None:
            console.print(render(snapshot(), width))
            return 0
        from rich.live import Live

        try:
            with Live(render(snapshot(), width), console=console, auto_refresh=False, screen=False) as live:
                while True:
                    time.sleep(watch)
                    live.update(render(snapshot(), console.width), refresh=True)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        engine.dispose()


__all__ = ["collect_status", "command_status", "render"]
