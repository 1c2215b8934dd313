"""Database connection: engines, the database clock, transient-error retry,
error translation and the schema check. The only module that knows drivers."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    wait_random_exponential,
)

from worker.errors import AccessDenied, ColaError, ConfigError, DatabaseUnreachable, SchemaError
from worker.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DRIVERS = {
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
}

# MySQL/MariaDB: deadlock, lock wait timeout, MariaDB's "record has changed",
# statement time limit (MariaDB max_statement_time, MySQL max_execution_time).
_MYSQL_TIMEOUT = {1205, 1969, 3024}
_MYSQL_TRANSIENT = {1213, 1020} | _MYSQL_TIMEOUT
_MYSQL_UNREACHABLE = {2002, 2003, 2005, 2006, 2013, 2055}
_MYSQL_DENIED = {1045, 1698}
_MYSQL_DB_ACCESS_DENIED = 1044
_MYSQL_UNKNOWN_DATABASE = 1049
# PostgreSQL's connection errors carry no SQLSTATE in psycopg: read the text.
_PG_NO_DATABASE = re.compile(r'database "[^"]*" does not exist')
_PG_NO_ROLE = re.compile(r'role "[^"]*" does not exist')
# PostgreSQL: deadlock_detected, serialization_failure, lock_not_available
# (lock_timeout), query_canceled (statement_timeout).
_PG_TIMEOUT = {"55P03", "57014"}
_PG_TRANSIENT = {"40P01", "40001"} | _PG_TIMEOUT
# A timeout has already waited its whole limit: one more try, not eight.
TIMEOUT_TRIES = 2


def parse_url(raw: str) -> URL:
    try:
        url = sa.make_url(raw)
    except (sa_exc.ArgumentError, ValueError):
        # Never echo the value: it may hold a password.
        raise ConfigError(
            "COLA_DATABASE_URL: not a valid SQLAlchemy URL (expected e.g. mysql+pymysql://user:pass@host/db)"
        ) from None
    if url.drivername in _DRIVERS:
        url = url.set(drivername=_DRIVERS[url.drivername])
    backend = url.get_backend_name()
    if backend not in ("mysql", "mariadb", "postgresql", "sqlite"):
        raise ConfigError(
            f"COLA_DATABASE_URL: unsupported database {backend!r} (use mysql, mariadb, postgresql or sqlite)"
        )
    if not (url.database or "").strip("/"):
        # PostgreSQL would quietly use the database named after the user, and
        # MySQL would connect to no database at all: both are mistakes here.
        if backend == "sqlite":
            raise ConfigError(
                "COLA_DATABASE_URL: no database file: SQLite needs a path (sqlite:///path/to/cola.db)"
            )
        raise ConfigError(
            f"COLA_DATABASE_URL: no database name after the host "
            f"(expected e.g. {url.drivername}://user:pass@host/cola)"
        )
    return url


# Where the Python module of each driver comes from (error messages only).
_DRIVER_PACKAGES = {
    "psycopg": "pip install 'cola-worker[postgres]'",
    "pymysql": "pip install 'cola-worker' (PyMySQL is one of its dependencies)",
}


def _missing_driver(url: URL, exc: ImportError) -> str:
    """The message for a URL whose driver cannot be imported."""
    driver = url.get_driver_name()
    module = exc.name or driver
    install = _DRIVER_PACKAGES.get(driver)
    if install is not None:
        return (
            f"COLA_DATABASE_URL: {url.get_backend_name()} needs the {driver} driver, "
            f"which is not installed ({module!r} cannot be imported): {install}"
        )
    backend = url.get_backend_name()
    supported = (
        f"postgresql:// (psycopg 3: {_DRIVER_PACKAGES['psycopg']})"
        if backend == "postgresql"
        else f"{backend}:// (PyMySQL, installed with cola-worker)"
    )
    return (
        f"COLA_DATABASE_URL: the driver {driver!r} is not installed ({module!r} cannot be imported); "
        f"use {supported}"
    )


def create_engine_from_settings(settings: Settings, *, pool_size: int = 5) -> Engine:
    return create_engine(
        settings.require_database_url(),
        pool_size=pool_size,
        lock_timeout=settings.db_lock_timeout,
        statement_timeout=settings.db_statement_timeout,
    )


def create_engine(
    raw_url: str,
    *,
    pool_size: int = 5,
    lock_timeout: float | None = None,
    statement_timeout: float | None = None,
) -> Engine:
    """An engine for ``raw_url``. ``lock_timeout`` and ``statement_timeout``
    (seconds; None or 0 = the server's default) are set on every session it
    opens (MariaDB/MySQL and PostgreSQL; SQLite has its busy timeout)."""
    url = parse_url(raw_url)
    backend = url.get_backend_name()
    # hide_parameters: driver errors would otherwise carry phone numbers into logs (G7).
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
    if backend in ("mysql", "mariadb"):
        # READ COMMITTED: under REPEATABLE READ gap locks made producers wait
        # and claimers deadlock (docs/design.md section 7).
        kwargs["isolation_level"] = "READ COMMITTED"
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_size
        kwargs["pool_recycle"] = 3600
        query = dict(url.query)
        query.setdefault("charset", "utf8mb4")
        url = url.set(query=query)
        # Read/write timeouts: a network that drops packets mid-query must not
        # hang the run's writer threads (and its shutdown) for ever.
        kwargs["connect_args"] = {"connect_timeout": 10, "read_timeout": 120, "write_timeout": 120}
    elif backend == "postgresql":
        kwargs["isolation_level"] = "READ COMMITTED"
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_size
        # TCP keepalives and a user timeout: the same, for libpq.
        kwargs["connect_args"] = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": 120000,
        }
    else:  # sqlite: writes are serialised; wait for the writer instead of failing.
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    try:
        engine = sa.create_engine(url, **kwargs)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, TypeError) as exc:
        raise ConfigError(f"COLA_DATABASE_URL: {type(exc).__name__}: cannot create an engine") from None
    except ImportError as exc:  # the dialect imports its driver here
        raise ConfigError(_missing_driver(url, exc)) from None

    if backend == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    elif lock_timeout or statement_timeout:
        _set_session_limits(engine, backend, lock_timeout or 0.0, statement_timeout or 0.0)

    return engine


def _set_session_limits(engine: Engine, backend: str, lock_timeout: float, statement_timeout: float) -> None:
    """Per-session limits, so that one statement stuck behind another
    session's row lock (an operator's open transaction) or running away gives
    up with an error instead of holding the run (and its rows) for ever.
    A lock wait timeout is transient (:func:`is_transient`)."""

    @sa.event.listens_for(engine, "connect")
    def _session_limits(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            for statement in session_limit_statements(
                backend, _server_info(dbapi_conn), lock_timeout, statement_timeout
            ):
                cur.execute(statement)
        finally:
            cur.close()
        if backend == "postgresql":
            dbapi_conn.commit()  # psycopg opened a transaction for the SETs


def _server_info(dbapi_conn: Any) -> str:
    get = getattr(dbapi_conn, "get_server_info", None)  # PyMySQL: "10.11.6-MariaDB-..."
    return str(get()) if callable(get) else ""


def session_limit_statements(
    backend: str, server_info: str, lock_timeout: float, statement_timeout: float
) -> list[str]:
    """The SET statements for a new session (0 = leave the server's default)."""
    out: list[str] = []
    if backend == "postgresql":
        if lock_timeout > 0:
            out.append(f"SET lock_timeout = {max(1, round(lock_timeout * 1000))}")
        if statement_timeout > 0:
            out.append(f"SET statement_timeout = {max(1, round(statement_timeout * 1000))}")
    elif backend in ("mysql", "mariadb"):
        if lock_timeout > 0:  # whole seconds, at least 1
            out.append(f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(lock_timeout))}")
        if statement_timeout > 0:
            if "mariadb" in server_info.lower():  # seconds; every statement
                out.append(f"SET SESSION max_statement_time = {statement_timeout:.3f}")
            else:  # MySQL: milliseconds; read-only SELECTs only
                out.append(f"SET SESSION max_execution_time = {max(1, round(statement_timeout * 1000))}")
    return out


# Command, table or column denied to this user (the login itself worked).
_MYSQL_NO_PRIVILEGE = frozenset({1142, 1143, 1227, 1370})


def _mysql_errno(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", exc)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


def _pg_sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None)


def is_transient(exc: BaseException) -> bool:
    """Deadlocks and lock timeouts: roll back and run the whole short transaction again."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if _mysql_errno(exc) in _MYSQL_TRANSIENT:
        return True
    if _pg_sqlstate(exc) in _PG_TRANSIENT:
        return True
    return "database is locked" in str(getattr(exc, "orig", ""))


def is_timeout(exc: BaseException) -> bool:
    """A lock wait or statement time limit ran out (``COLA_DB_LOCK_TIMEOUT``,
    ``COLA_DB_STATEMENT_TIMEOUT``)."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    return _mysql_errno(exc) in _MYSQL_TIMEOUT or _pg_sqlstate(exc) in _PG_TIMEOUT


def transaction(engine: Engine, fn: Callable[[Connection], T], *, attempts: int = 8) -> T:
    """Run ``fn`` in one transaction; re-run it whole on deadlock or timeout
    (bounded: ``attempts`` tries, of which at most ``TIMEOUT_TRIES`` may end
    in a lock wait or statement timeout, each of which already waited its limit)."""
    timeouts = 0

    def stop(state: RetryCallState) -> bool:
        nonlocal timeouts
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is not None and is_timeout(exc):
            timeouts += 1
        return state.attempt_number >= attempts or timeouts >= TIMEOUT_TRIES

    @retry(
        retry=retry_if_exception(is_transient),
        stop=stop,
        wait=wait_random_exponential(multiplier=0.02, max=1.0),
        reraise=True,
    )
    def _once() -> T:
        with engine.begin() as conn:
            return fn(conn)

    return _once()


def translate_error(exc: BaseException) -> BaseException:
    """A driver error becomes the project's own exception (exit 2 or 3)."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return exc
    errno = _mysql_errno(exc)
    text = str(getattr(exc, "orig", exc)).lower()
    if is_timeout(exc):
        return ColaError(
            f"a database statement gave up after its time limit ({_safe(exc)}): another session may "
            "hold a lock on these rows (an open transaction?); try again, or raise "
            "COLA_DB_LOCK_TIMEOUT / COLA_DB_STATEMENT_TIMEOUT"
        )
    if errno in _MYSQL_NO_PRIVILEGE or _pg_sqlstate(exc) == "42501":
        return AccessDenied(
            f"the database user lacks a privilege for this command: {_safe(exc)} "
            "(schema changes need the migration user: see sql/grants/)"
        )
    if errno == _MYSQL_UNKNOWN_DATABASE or _pg_sqlstate(exc) == "3D000" or _PG_NO_DATABASE.search(text):
        return ConfigError(
            f"COLA_DATABASE_URL: the database does not exist: {_safe(exc)}. "
            "Create it, or correct its name in the URL, then run `cola-worker db upgrade`"
        )
    if errno == _MYSQL_DB_ACCESS_DENIED:
        # MySQL also answers this, rather than 1049, to a user who may not see the database.
        return AccessDenied(f"database access denied (or the database does not exist): {_safe(exc)}")
    if errno in _MYSQL_DENIED or "password authentication failed" in text or _PG_NO_ROLE.search(text):
        return AccessDenied(f"database access denied: {_safe(exc)}")
    if (
        errno in _MYSQL_UNREACHABLE
        or "connection refused" in text
        or "could not connect" in text
        or "connection failed" in text
        or "timeout expired" in text
        or "name or service not known" in text
        or "unable to open database file" in text
        or _pg_sqlstate(exc) in _PG_CONNECTION_LOST
        or "server closed the connection" in text
        or "terminating connection" in text
        or "connection is closed" in text
        or "connection is lost" in text
    ):
        return DatabaseUnreachable(f"database unreachable: {_safe(exc)}")
    return exc


# The server went away under an open connection: shutdown, crash, lost link.
_PG_CONNECTION_LOST = frozenset({"57P01", "57P02", "57P03", "08000", "08003", "08006"})


def _safe(exc: BaseException) -> str:
    """The driver's message, first line only (it never contains the password)."""
    orig = getattr(exc, "orig", exc)
    return str(orig).strip().splitlines()[0][:300] if str(orig).strip() else type(orig).__name__


def db_now(conn: Connection) -> dt.datetime:
    """The database's clock (naive UTC, microseconds). Lease and heartbeat
    decisions use it, so a host whose clock is off cannot take live rows."""
    backend = conn.dialect.name
    if backend in ("mysql", "mariadb"):
        value = conn.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar_one()
    elif backend == "postgresql":
        value = conn.execute(sa.text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar_one()
    else:  # sqlite is in-process: its clock is this host's clock
        return dt.datetime.now(dt.UTC).replace(tzinfo=None)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.replace(tzinfo=None)


# --- migrations -------------------------------------------------------------


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("worker.migrations")))
    cfg.attributes["configure_logging"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


_REVISION_LINE = re.compile(
    r"""^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(?:None|["']([^"']+)["'])""", re.M
)


def head_revision() -> str:
    """The latest migration, read from the scripts' own ``revision`` lines.

    Every run checks the schema first; reading a few files costs microseconds
    where importing Alembic costs a third of a cron run's start-up CPU. A
    history that is not one straight line is left to Alembic to explain
    (``tests/migration`` checks both agree)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in resources.files("worker.migrations.versions").iterdir():
        if not script.name.endswith(".py") or script.name.startswith("_"):
            continue
        for kind, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8")):
            if value:
                (revisions if kind == "revision" else parents).add(value)
    heads = revisions - parents
    if len(heads) == 1:
        return heads.pop()
    return _alembic_head()


def _alembic_head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Connection) -> str | None:
    """The database's revision (``alembic_version``), None when it has no schema."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return str(rows[0]) if len(rows) == 1 else None


def check_schema(engine: Engine) -> None:
    """Refuse (exit 2) a schema that is not at the latest migration."""
    try:
        with engine.connect() as conn:
            current = current_revision(conn)
    except sa_exc.DBAPIError as exc:
        raise translate_error(exc) from exc
    head = head_revision()
    if current is None:
        raise SchemaError("the database has no cola-worker schema: run `cola-worker db upgrade`")
    if current != head:
        raise SchemaError(
            f"the schema is at {current}, not at the latest migration {head}: run `cola-worker db upgrade`"
        )


def _no_statement_limit(conn: Connection) -> None:
    """A migration may rewrite a large table: no statement time limit for it
    (``COLA_DB_STATEMENT_TIMEOUT`` guards the queue, not the schema)."""
    name = conn.dialect.name
    if name == "postgresql":
        conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
    elif name in ("mysql", "mariadb"):
        mariadb = getattr(conn.dialect, "is_mariadb", False)
        variable = "max_statement_time" if mariadb else "max_execution_time"
        conn.execute(sa.text(f"SET SESSION {variable} = 0"))


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as conn:
        _no_statement_limit(conn)
        command.upgrade(alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        _no_statement_limit(conn)
        command.downgrade(alembic_config(conn), revision)
