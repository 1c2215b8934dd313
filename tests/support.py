"""Helpers shared by the integration and acceptance tests: seeding rows,
running the real `cola-worker` in a subprocess, reading the table back."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from worker import db
from worker.schema import cola_envios, sesiones_envio

PROJECT = Path(__file__).resolve().parent.parent


class ScratchDatabase:
    """A database of its own, dropped by :meth:`drop`: a new database on the
    server at ``server_url``, or an SQLite file in ``directory``. Used by the
    test fixtures and the benchmarks."""

    def __init__(
        self, backend: str, server_url: str | None, directory: Path, prefix: str = "cola_t_"
    ) -> None:
        self.backend = backend
        self.name = prefix + uuid.uuid4().hex[:12]
        self._admin: sa.Engine | None = None
        if backend == "sqlite":
            self.url = f"sqlite:///{directory / (self.name + '.db')}"
            return
        assert server_url, backend
        base = db.parse_url(server_url)
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f"CREATE DATABASE {self.name}"))
        except BaseException:
            admin.dispose()
            raise
        self._admin = admin
        self.url = base.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        if self._admin is None:
            return
        force = " WITH (FORCE)" if self.backend == "postgresql" else ""
        with self._admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {self.name}{force}"))
        self._admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def phone(i: int) -> str:
    """A valid Peruvian mobile number, distinct for each i < 10**8."""
    return f"+519{i:08d}"


def seed(
    url: str,
    n: int,
    *,
    session: str = "s1",
    start: int = 0,
    recipients: Iterable[str] | None = None,
    max_attempts: int = 3,
    enviar_hasta: dt.datetime | None = None,
    text: str = "hola",
    session_state: str = "activa",
) -> list[int]:
    """Insert ``n`` pendiente text rows quickly (no validation: the run is under test)."""
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            now = db.db_now(conn)
            sid = conn.execute(
                sa.select(sesiones_envio.c.id).where(sesiones_envio.c.nombre == session)
            ).scalar_one_or_none()
            if sid is None:
                sid = conn.execute(
                    sesiones_envio.insert().values(nombre=session, estado=session_state, creado_at=now)
                ).inserted_primary_key[0]
            phones = list(recipients) if recipients is not None else [phone(start + k) for k in range(n)]
            rows = [
                {
                    "sesion_id": sid,
                    "cliente_id": f"c{start + k}",
                    "cliente_nombre": f"Cliente {start + k}",
                    "telefono": phones[k % len(phones)],
                    "tipo": "text",
                    "payload": json.dumps({"text": f"{text} {start + k}"}),
                    "estado": "pendiente",
                    "intentos": 0,
                    "max_intentos": max_attempts,
                    "proximo_intento_at": now - dt.timedelta(seconds=1),
                    "enviar_hasta": enviar_hasta,
                    "clave": f"{session}-{start + k}",
                    "creado_at": now,
                    "actualizado_at": now,
                }
                for k in range(n)
            ]
            for i in range(0, len(rows), 1000):
                conn.execute(cola_envios.insert(), rows[i : i + 1000])
        with engine.connect() as conn:
            return [
                int(r[0])
                for r in conn.execute(
                    sa.select(cola_envios.c.id).where(cola_envios.c.clave.like(f"{session}-%")).order_by("id")
                )
            ]
    finally:
        engine.dispose()


def rows(url: str) -> dict[int, dict[str, Any]]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return {int(r.id): dict(r._mapping) for r in conn.execute(sa.select(cola_envios))}
    finally:
        engine.dispose()


def states(url: str) -> Counter[str]:
    return Counter(r["estado"] for r in rows(url).values())


def scalar(url: str, sql: str, **params: Any) -> Any:
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            return conn.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


def execute(url: str, sql: str, **params: Any) -> int:
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            return int(conn.execute(sa.text(sql), params).rowcount)
    finally:
        engine.dispose()


def worker_env(url: str, tmp: Path, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update(
        {
            "COLA_DATABASE_URL": url,
            "COLA_LOCK_FILE": str(tmp / "locks" / "run.lock"),
            "COLA_RATE_LIMIT": "1000",
            "COLA_PAIR_INTERVAL": "0",
            "COLA_LEASE_SECONDS": "30",
            "COLA_BACKOFF_BASE": "30",
            "PYTHONUNBUFFERED": "1",
        }
    )
    (tmp / "locks").mkdir(exist_ok=True, mode=0o700)
    for key, value in overrides.items():
        env["COLA_" + key.upper()] = str(value)
    return env


def cola_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def run_worker(
    env: Mapping[str, str], *args: str, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cola_cmd(*args),
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        cwd=PROJECT,
    )


def start_worker(env: Mapping[str, str], *args: str, log: Path | None = None) -> subprocess.Popen[str]:
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    try:
        return subprocess.Popen(
            cola_cmd(*args),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=PROJECT,
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def wait_until(predicate: Callable[[], bool], timeout: float = 30, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Signal only the process (group) this test started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
