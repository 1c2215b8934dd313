"""Status against real databases: counts, pending ages, live and dead runs."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa

from worker import db
from worker.errors import InputError
from worker.schema import STATES, cola_envios, ejecuciones, sesiones_envio
from worker.settings import Settings, load_settings
from worker.status import collect_status, render

LEASE = 60.0


@pytest.fixture
def settings() -> Settings:
    return load_settings(environ={"COLA_LEASE_SECONDS": str(LEASE)})


def _now(engine: sa.Engine) -> dt.datetime:
    with engine.connect() as conn:
        return db.db_now(conn)


def _session(conn: sa.Connection, name: str, now: dt.datetime, estado: str = "activa") -> int:
    return int(
        conn.execute(
            sesiones_envio.insert()
            .values(nombre=name, estado=estado, creado_at=now)
            .returning(sesiones_envio.c.id)
        ).scalar_one()
        if conn.dialect.insert_returning
        else conn.execute(sesiones_envio.insert().values(nombre=name, estado=estado, creado_at=now)).lastrowid
    )


_seq = iter(range(1, 10**6))


def _job(
    conn: sa.Connection, sesion_id: int, estado: str, *, created: dt.datetime, next_at: dt.datetime
) -> None:
    n = next(_seq)
    conn.execute(
        cola_envios.insert().values(
            sesion_id=sesion_id,
            cliente_id=f"c{n}",
            telefono=f"+5198{n:07d}",
            tipo="text",
            payload='{"text":"x"}',
            estado=estado,
            intentos=0,
            max_intentos=5,
            proximo_intento_at=next_at,
            clave=f"k{n}",
            creado_at=created,
            actualizado_at=created,
        )
    )


def _run(
    conn: sa.Connection, host: str, *, started: dt.datetime, beat: dt.datetime, finished: Any = None
) -> None:
    conn.execute(
        ejecuciones.insert().values(
            host=host,
            pid=4242,
            modo="run",
            iniciada_at=started,
            latido_at=beat,
            finalizada_at=finished,
            estado="activa" if finished is None else "terminada",
            lease_segundos=LEASE,
            reclamados=10,
            enviados=7,
            errores=1,
            inciertos=1,
            reintentos=2,
        )
    )


def test_counts_by_state_and_pending_ages(engine: sa.Engine, settings: Settings) -> None:
    now = _now(engine)
    ago = lambda s: now - dt.timedelta(seconds=s)  # noqa: E731
    with engine.begin() as conn:
        a = _session(conn, "a", ago(4000))
        b = _session(conn, "b", ago(10), estado="pausada")
        empty = _session(conn, "empty", ago(5))
        _job(conn, a, "pendiente", created=ago(3600), next_at=ago(1800))  # due, waiting 30 min
        _job(conn, a, "pendiente", created=ago(7200), next_at=ago(-3600))  # oldest, but scheduled in 1 h
        _job(conn, a, "pendiente", created=ago(60), next_at=ago(60))  # due
        _job(conn, a, "enviado", created=ago(9000), next_at=ago(9000))
        _job(conn, a, "enviado", created=ago(9000), next_at=ago(9000))
        _job(conn, a, "incierto", created=ago(9000), next_at=ago(9000))
        _job(conn, b, "procesando", created=ago(100), next_at=ago(100))
        _job(conn, b, "error", created=ago(100), next_at=ago(100))
    data = collect_status(engine, settings, None)
    by_name = {s["name"]: s for s in data["sessions"]}
    assert list(by_name) == ["a", "b", "empty"]

    sa_ = by_name["a"]
    assert sa_["counts"] == {
        "pendiente": 3,
        "procesando": 0,
        "enviando": 0,
        "enviado": 2,
        "error": 0,
        "incierto": 1,
        "cancelado": 0,
    }
    assert sa_["total"] == 6 and sa_["state"] == "activa" and sa_["id"] == a
    assert sa_["due_now"] == 2
    assert sa_["oldest_pending_age_seconds"] == pytest.approx(7200, abs=30)
    assert sa_["oldest_due_age_seconds"] == pytest.approx(1800, abs=30)

    sb = by_name["b"]
    assert sb["state"] == "pausada"
    assert sb["counts"]["procesando"] == 1 and sb["counts"]["error"] == 1
    assert sb["due_now"] == 0 and sb["oldest_pending_age_seconds"] is None

    se = by_name["empty"]
    assert se["id"] == empty and se["counts"] == dict.fromkeys(STATES, 0) and se["total"] == 0

    totals = data["totals"]
    assert totals["counts"]["pendiente"] == 3 and totals["counts"]["enviado"] == 2 and totals["total"] == 8
    assert totals["due_now"] == 2
    assert totals["oldest_pending_age_seconds"] == pytest.approx(7200, abs=30)
    json.dumps(data)  # JSON-ready


def test_session_filter(engine: sa.Engine, settings: Settings) -> None:
    now = _now(engine)
    with engine.begin() as conn:
        a = _session(conn, "a", now)
        b = _session(conn, "b", now)
        _job(conn, a, "pendiente", created=now, next_at=now)
        _job(conn, b, "pendiente", created=now, next_at=now)
        _job(conn, b, "pendiente", created=now, next_at=now)
    data = collect_status(engine, settings, None, session="b")
    assert [s["name"] for s in data["sessions"]] == ["b"]
    assert data["totals"]["counts"]["pendiente"] == 2
    with pytest.raises(InputError, match="no session named 'zzz'"):
        collect_status(engine, settings, None, session="zzz")


def test_live_and_dead_runs_by_the_database_clock(engine: sa.Engine, settings: Settings) -> None:
    now = _now(engine)
    ago = lambda s: now - dt.timedelta(seconds=s)  # noqa: E731
    with engine.begin() as conn:
        _run(conn, "live-1", started=ago(600), beat=ago(5))
        _run(conn, "live-2", started=ago(30), beat=ago(LEASE - 20))
        _run(conn, "dead-1", started=ago(900), beat=ago(LEASE + 30))
        _run(conn, "dead-2", started=ago(9000), beat=ago(8000))
        _run(conn, "done", started=ago(9000), beat=ago(8000), finished=ago(7999))
        _run(conn, "done-recent", started=ago(50), beat=ago(1), finished=ago(1))
    data = collect_status(engine, settings, {"pid": 99, "host": "h", "started": "t"})
    live = data["live_runs"]
    assert [r["host"] for r in live] == ["live-1", "live-2"]
    first = live[0]
    assert first["pid"] == 4242 and first["mode"] == "run"
    assert first["heartbeat_age_seconds"] == pytest.approx(5, abs=20)
    assert first["counts"] == {"claimed": 10, "sent": 7, "errors": 1, "uncertain": 1, "retries": 2}
    assert dt.datetime.fromisoformat(first["started_at"]).utcoffset() == dt.timedelta(0)
    assert data["dead_runs"] == 2
    assert data["lock_holder"] == {"pid": 99, "host": "h", "started": "t"}
    assert data["lease_seconds"] == LEASE


def test_render_shows_counts_runs_and_dead_warning(engine: sa.Engine, settings: Settings) -> None:
    from rich.console import Console

    now = _now(engine)
    with engine.begin() as conn:
        s = _session(conn, "campaña", now)
        _job(conn, s, "pendiente", created=now, next_at=now)
        _run(conn, "worker-host-9", started=now, beat=now)
        _run(conn, "gone", started=now, beat=now - dt.timedelta(seconds=LEASE * 3))
    console = Console(width=250, record=True)
    console.print(render(collect_status(engine, settings, None)))
    out = console.export_text()
    assert "campaña" in out and "worker-host-9" in out
    assert "1 run(s) silent past the lease" in out
    assert "lock holder: none" in out


def test_status_says_why_nothing_is_due_and_fits_80_columns(engine: sa.Engine, settings: Settings) -> None:
    from rich.console import Console

    now = _now(engine)
    with engine.begin() as conn:
        later = _session(conn, "recordatorios-de-la-semana-proxima", now)
        _job(conn, later, "pendiente", created=now, next_at=now + dt.timedelta(minutes=30))
        paused = _session(conn, "pausada", now, estado="pausada")
        _job(conn, paused, "pendiente", created=now, next_at=now - dt.timedelta(seconds=5))
        due = _session(conn, "ahora", now)
        _job(conn, due, "pendiente", created=now, next_at=now - dt.timedelta(seconds=5))
        _job(conn, due, "incierto", created=now, next_at=now)
        _run(conn, "a-very-long-worker-host-name.example.internal", started=now, beat=now)
    data = collect_status(engine, settings, {"pid": 7, "host": "h", "started": "t"})
    reasons = {s["name"]: s["not_due_reason"] for s in data["sessions"]}
    assert reasons["recordatorios-de-la-semana-proxima"].startswith("scheduled later: next in 29m")
    assert reasons["pausada"].startswith("session paused")
    assert reasons["ahora"] is None
    json.dumps(data)

    narrow = Console(width=80, record=True)
    narrow.print(render(data, 80))
    out = narrow.export_text()
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "nothing due: scheduled later" in out and "nothing due: session paused" in out
    assert "incierto" in out and "a-very-long-work" in out

    wide = Console(width=200, record=True)
    wide.print(render(data, 200))
    text = wide.export_text()
    assert all(state in text for state in STATES) and "nothing due: session paused" in text


def test_runs_are_judged_by_their_own_lease(engine: sa.Engine, settings: Settings) -> None:
    now = _now(engine)
    with engine.begin() as conn:
        for host, lease in (("long-lease", 600.0), ("short-lease", 30.0)):
            conn.execute(
                ejecuciones.insert().values(
                    host=host,
                    pid=1,
                    modo="run",
                    iniciada_at=now - dt.timedelta(seconds=300),
                    latido_at=now - dt.timedelta(seconds=100),
                    estado="activa",
                    lease_segundos=lease,
                )
            )
    data = collect_status(engine, settings, None)  # this caller's lease is 60 s
    assert [r["host"] for r in data["live_runs"]] == ["long-lease"]
    assert data["live_runs"][0]["lease_seconds"] == 600.0
    assert data["dead_runs"] == 1
