"""Shared fixtures: real databases.

Database URLs come from the environment: ``COLA_TEST_MYSQL_URL`` (MariaDB or
MySQL) and ``COLA_TEST_POSTGRES_URL``. Without one, testcontainers (MySQL 8.4)
is used for MySQL if a Docker engine answers; otherwise the tests skip saying
why. ``COLA_TEST_REQUIRE_DB=1`` (set by .ci/run) turns every such skip into a
failure. Each test gets a fresh database of its own on the server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import ScratchDatabase

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer

REQUIRE_DB = os.environ.get("COLA_TEST_REQUIRE_DB") == "1"
BACKENDS = ("sqlite", "mysql", "postgresql")

_container_url: dict[str, str | None] = {}


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_DB:
        pytest.fail(f"database required (COLA_TEST_REQUIRE_DB=1) but unavailable: {reason}")
    pytest.skip(reason)


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


def _mysql_from_container() -> str | None:
    if "mysql" not in _container_url:
        _container_url["mysql"] = None
        if _docker_answers():
            from testcontainers.mysql import MySqlContainer

            container = MySqlContainer("mysql:8.4", username="root", password="test", dbname="test")
            container.start()
            host = container.get_container_host_ip()
            port = container.get_exposed_port(3306)
            _container_url["mysql"] = f"mysql+pymysql://root:test@{host}:{port}/test"
    return _container_url["mysql"]


def server_url(backend: str) -> str:
    """The URL of a server for ``backend`` (skips or fails when there is none)."""
    if backend == "mysql":
        url = os.environ.get("COLA_TEST_MYSQL_URL") or _mysql_from_container()
        if not url:
            _skip_or_fail(
                "no MySQL/MariaDB: set COLA_TEST_MYSQL_URL (e.g. mysql+pymysql://root@127.0.0.1/test) "
                "or run a Docker engine for testcontainers"
            )
        assert url
        return url
    if backend == "postgresql":
        url = os.environ.get("COLA_TEST_POSTGRES_URL")
        if not url:
            _skip_or_fail(
                "no PostgreSQL: set COLA_TEST_POSTGRES_URL (e.g. postgresql+psycopg://postgres@127.0.0.1/test)"
            )
        assert url
        return url
    raise ValueError(backend)


def fresh_database(backend: str, tmp_path: Path) -> ScratchDatabase:
    """A database of its own for one test (skips, or fails under
    COLA_TEST_REQUIRE_DB=1, when the server is not reachable)."""
    server = None if backend == "sqlite" else server_url(backend)
    try:
        return ScratchDatabase(backend, server, tmp_path)
    except sa.exc.OperationalError as exc:
        _skip_or_fail(f"{backend} server at the configured URL is not reachable: {exc.orig}")
        raise


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of the parametrised backend."""
    fresh = fresh_database(backend, tmp_path)
    try:
        yield fresh.url
    finally:
        fresh.drop()


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """A fresh database at the latest migration."""
    engine = db.create_engine(empty_db_url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    return empty_db_url


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    """A migrated SQLite database, for behaviour that does not depend on the backend."""
    fresh = fresh_database("sqlite", tmp_path)
    engine = db.create_engine(fresh.url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    return fresh.url


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The local fake provider (the Meta Cloud API shape), on a free port."""
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = db.create_engine(db_url, pool_size=10)
    try:
        yield eng
    finally:
        eng.dispose()


def pytest_report_header(config: Any) -> list[str]:
    mysql = "env" if os.environ.get("COLA_TEST_MYSQL_URL") else "testcontainers-or-skip"
    postgres = "env" if os.environ.get("COLA_TEST_POSTGRES_URL") else "skip"
    return [f"databases: mysql={mysql} postgres={postgres} require={REQUIRE_DB}"]
