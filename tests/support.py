"""Helpers shared by the integration and acceptance tests: seeding rows,
running the real `cola-worker` in a subprocess, reading the table back."""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


# --- private database servers (docs/design.md section 8) ----------------------------
#
# A test that kills or restarts a database uses a server of its own, started
# here on a free port in a temporary directory, and kills only that process
# (group), by its pid. The shared servers are never touched.

MARIADBD = "/usr/sbin/mariadbd"


class ServerUnavailable(Exception):
    """The binaries for a private server are not installed (the caller skips,
    or fails under COLA_TEST_REQUIRE_DB=1)."""


def _wait_for_server(url: str, proc: subprocess.Popen[bytes], setup: Callable[[sa.Connection], None]) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with engine.connect() as conn:
                    setup(conn)
                return
            except sa.exc.OperationalError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        engine.dispose()


class PrivateMariaDB:
    """A throwaway mariadbd on a free port, in a directory of its own.
    ``start()`` may be called again after ``kill()``: same data directory,
    so the restart goes through InnoDB crash recovery."""

    def __init__(self, extra_args: Iterable[str] = ()) -> None:
        if not (os.path.exists(MARIADBD) and shutil.which("mariadb-install-db")):
            raise ServerUnavailable("mariadbd / mariadb-install-db are not installed")
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="cola-privdb-", dir="/tmp"))
        os.chmod(self.dir, 0o755)  # mariadbd runs as `mysql` and must reach its files
        self.data = self.dir / "data"
        self.run = self.dir / "run"
        for d in (self.data, self.run):
            d.mkdir()
            shutil.chown(d, "mysql", "mysql")
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ],
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/cola"

    def start(self) -> None:
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    MARIADBD,
                    "--no-defaults",
                    f"--datadir={self.data}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.run / 'sock'}",
                    f"--pid-file={self.run / 'pid'}",
                    "--user=mysql",
                    "--skip-grant-tables",
                    "--innodb-buffer-pool-size=32M",
                    *self.extra_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        _wait_for_server(
            f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql",
            self.proc,
            lambda conn: conn.execute(sa.text("CREATE DATABASE IF NOT EXISTS cola")),
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # only our own server, by its pid
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server binaries (Debian layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie no longer holds anything)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] != "Z"


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (``initdb``) on a free port, in a
    directory of its own. ``kill()`` SIGKILLs the postmaster and its backends
    (a crash, not a shutdown); ``start()`` again recovers from the WAL. PostgreSQL refuses to run as
    root: then the cluster runs as the ``postgres`` user."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise ServerUnavailable(
                "PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed"
            )
        self.bindir = bindir
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
        self.dir = Path(tempfile.mkdtemp(prefix="cola-privpg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        self.run = self.dir / "run"
        for d in (self.data, self.run):
            d.mkdir(mode=0o700)
            if self.user:
                shutil.chown(d, self.user, self.user)
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self.user,
            cwd=self.dir,
        )
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/cola"

    def start(self) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - closed below, the child keeps its copy
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.run}",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=32MB",
                    "-c",
                    "fsync=off",  # safe against a killed process (the OS keeps the writes), not a power cut
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                user=self.user,
                cwd=self.dir,
                start_new_session=True,
            )
        finally:
            log.close()

        def create(conn: sa.Connection) -> None:
            if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = 'cola'")).first() is None:
                conn.execute(sa.text("CREATE DATABASE cola"))

        _wait_for_server(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres", self.proc, create)

    def kill(self) -> None:
        """SIGKILL the postmaster and every child of it (each backend makes
        itself a process group leader, so the postmaster's group is not
        enough): a crash of the whole server, then wait until all are gone,
        or the restart would find the old shared memory still attached."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            os.kill(pid, signal.SIGSTOP)  # no new backend is forked meanwhile
        except ProcessLookupError:
            pass
        children = _children(pid)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
