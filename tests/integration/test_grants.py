"""``sql/grants/*.sql``: a migration user that changes the schema and a runtime
user that only reads and writes rows, enough for every command the worker runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import fresh_database, server_url
from support import PROJECT, run_worker, worker_env

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer

GRANTS = PROJECT / "sql" / "grants"


def _admin_sql(backend: str, url: str, script: str) -> None:
    """Run ``script`` through the real command-line client, as the administrator."""
    u = db.parse_url(url)
    if backend == "mysql":
        client = shutil.which("mysql") or shutil.which("mariadb")
        assert client, "the mysql client is not installed (Debian: mariadb-client)"
        cmd = [client, "-h", u.host or "127.0.0.1", "-P", str(u.port or 3306), "-u", u.username or "root"]
        if u.password:
            cmd.append(f"-p{u.password}")
    else:
        client = shutil.which("psql")
        assert client, "the psql client is not installed (Debian: postgresql-client)"
        cmd = [client, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", u.host or "127.0.0.1"]
        cmd += ["-p", str(u.port or 5432), "-U", u.username or "postgres", "-d", str(u.database)]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _drop_users(backend: str, url: str, users: list[str]) -> None:
    engine = sa.create_engine(db.parse_url(url), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            for user in users:
                if backend == "mysql":
                    conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))
                else:
                    conn.execute(sa.text(f"DROP ROLE IF EXISTS {user}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["mysql", "postgresql"])
def users(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(backend, migration URL, runtime URL) on a scratch database set up by the grants file."""
    backend = str(request.param)
    fresh = fresh_database(backend, tmp_path)
    suffix = uuid.uuid4().hex[:8]
    migrate, app = f"cola_migrate_{suffix}", f"cola_app_{suffix}"
    script = (GRANTS / f"{backend}.sql").read_text()
    # The file as a DBA edits it: database name, user names, passwords.
    script = script.replace("cola_migrate", migrate).replace("cola_app", app)
    script = re.sub(r"`cola`", f"`{fresh.name}`", script)
    script = re.sub(r"DATABASE cola\b", f"DATABASE {fresh.name}", script)
    base = db.parse_url(fresh.url)
    try:
        _admin_sql(backend, fresh.url, script)
        migrate_url = base.set(username=migrate, password="CHANGE-ME-migrate")
        app_url = base.set(username=app, password="CHANGE-ME-app")
        yield (
            backend,
            migrate_url.render_as_string(hide_password=False),
            app_url.render_as_string(hide_password=False),
        )
    finally:
        fresh.drop()
        _drop_users(backend, server_url(backend), [app, migrate])


def test_migration_user_migrates_runtime_user_runs_everything_else(
    users: tuple[str, str, str], tmp_path: Path
) -> None:
    _backend, migrate_url, app_url = users
    # The runtime user cannot migrate: it has no DDL.
    refused = run_worker(worker_env(app_url, tmp_path), "db", "upgrade")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "lacks a privilege" in refused.stderr and "sql/grants" in refused.stderr

    upgraded = run_worker(worker_env(migrate_url, tmp_path), "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr

    env = worker_env(app_url, tmp_path)
    csv = tmp_path / "citas.csv"
    lines = "".join(f"c{k},+5199900000{k},hola {k}\n" for k in range(5))
    csv.write_text("cliente_id,telefono,mensaje\n" + lines)
    enq = run_worker(env, "enqueue", "--session", "grants", "--csv", str(csv))
    assert enq.returncode == 0, enq.stderr
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    try:
        ran = run_worker({**env, "COLA_PROVIDER": "fake", "COLA_FAKE_BASE_URL": server.base_url}, "run")
        assert ran.returncode == 0, ran.stderr
        assert server.stats()["accepted"] == 5
    finally:
        server.stop()
    for args in (("status", "--json"), ("audit",), ("prune", "--older-than-days", "0"), ("recover",)):
        proc = run_worker(env, *args)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"

    # And it cannot change the schema.
    engine = db.create_engine(app_url)
    try:
        for ddl in ("DROP TABLE intentos_envio", "ALTER TABLE cola_envios ADD COLUMN x INTEGER"):
            with pytest.raises(sa.exc.DBAPIError) as denied, engine.begin() as conn:
                conn.execute(sa.text(ddl))
            message = str(denied.value.orig).lower()
            assert "denied" in message or "must be owner" in message, message
    finally:
        engine.dispose()
    engine = db.create_engine(migrate_url)
    try:
        with engine.connect() as conn:
            assert "intentos_envio" in sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
