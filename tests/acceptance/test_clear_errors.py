"""Clear errors, never a traceback: the installed command as an operator meets
it, a subprocess each time. Bad configuration or input exits 2 (3: the
database cannot be reached) with one message naming the setting or the line."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import server_url
from support import PROJECT, free_port, scalar

_EXE = Path(sys.executable).parent / "cola-worker"
CLI = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "worker"]

PHONE = "+51987654321"
EXTRA_HINT = "pip install 'cola-worker[postgres]'"


def cola(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    base.update({"COLA_LOCK_FILE": str(lock_dir / "run.lock"), "COLA_PROVIDER": "fake", **env})
    return subprocess.run(
        [*CLI, *args], env=base, capture_output=True, text=True, timeout=120, cwd=PROJECT, check=False
    )


def assert_clear(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def with_database(url: str, database: str) -> str:
    return sa.make_url(url).set(database=database).render_as_string(hide_password=False)


COMMANDS = [
    ["status"],
    ["db", "upgrade"],
    ["run"],
    ["enqueue", "--session", "s", "--to", PHONE, "--text", "hola"],
]


# --- the database URL ------------------------------------------------------------


def _server_without_database(backend: str) -> str:
    """``driver://user@host:port`` of the test server, no database name.

    MySQL's is the real server (without a database selected every statement
    fails, so nothing can be written there). PostgreSQL's points at a port
    nobody listens on: before the fix it would have connected to the database
    named after the user and written the schema into it."""
    if backend == "mysql":
        url = sa.make_url(server_url("mysql"))
        return sa.engine.URL.create(
            url.drivername, url.username, url.password, url.host, url.port
        ).render_as_string(hide_password=False)
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}"


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0] if a[0] != "db" else "db-upgrade")
def test_database_url_without_a_database_name(backend: str, args: list[str], tmp_path: Path) -> None:
    base = _server_without_database(backend)
    for url in (base, base + "/"):
        proc = cola(tmp_path, *args, COLA_DATABASE_URL=url)
        assert_clear(proc, 2, "COLA_DATABASE_URL", "database name")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_sqlite_url_without_a_file(url: str, tmp_path: Path) -> None:
    proc = cola(tmp_path, "status", COLA_DATABASE_URL=url)
    assert_clear(proc, 2, "COLA_DATABASE_URL", "sqlite:///")


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_unknown_database_is_named_not_called_access_denied(backend: str, tmp_path: Path) -> None:
    name = f"cola_no_such_{uuid.uuid4().hex[:8]}"
    url = with_database(server_url(backend), name)
    for args in (["status"], ["db", "upgrade"]):
        proc = cola(tmp_path, *args, COLA_DATABASE_URL=url)
        assert_clear(proc, 2, "COLA_DATABASE_URL", name, "does not exist")
        assert "access denied" not in proc.stderr.lower()


def _hide_module(tmp_path: Path, module: str) -> str:
    """A directory that, first on PYTHONPATH, makes ``import module`` fail as
    it does where the module is not installed."""
    shadow = tmp_path / "shadow"
    (shadow / module).mkdir(parents=True)
    (shadow / module / "__init__.py").write_text(
        f"raise ModuleNotFoundError({f'No module named {module!r}'!r}, name={module!r})\n"
    )
    return str(shadow)


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@127.0.0.1:5432/cola", "postgresql+psycopg://u@127.0.0.1:5432/cola"],
)
@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0] if a[0] != "db" else "db-upgrade")
def test_postgresql_without_its_driver_names_the_extra(url: str, args: list[str], tmp_path: Path) -> None:
    proc = cola(tmp_path, *args, COLA_DATABASE_URL=url, PYTHONPATH=_hide_module(tmp_path, "psycopg"))
    assert_clear(proc, 2, "COLA_DATABASE_URL", "psycopg", EXTRA_HINT)


@pytest.mark.parametrize(
    ("url", "module"),
    [
        ("postgresql+psycopg2://u@127.0.0.1:5432/cola", "psycopg2"),
        ("mysql+mysqldb://u@127.0.0.1:3306/cola", "MySQLdb"),
    ],
)
def test_a_driver_named_in_the_url_that_is_not_installed(url: str, module: str, tmp_path: Path) -> None:
    env = {"COLA_DATABASE_URL": url}
    if importlib.util.find_spec(module) is not None:
        env["PYTHONPATH"] = _hide_module(tmp_path, module)
    proc = cola(tmp_path, "status", **env)
    assert_clear(proc, 2, "COLA_DATABASE_URL", module, "not installed")


# --- non-UTF-8 input ----------------------------------------------------------------


def _csv_lines(n: int) -> list[bytes]:
    return [f"c{i},Cliente {i},+5198765{i:04d},Hola {i}\n".encode() for i in range(n)]


HEADER = b"cliente_id,cliente_nombre,telefono,mensaje\n"


def _count(url: str) -> int:
    return int(scalar(url, "SELECT COUNT(*) FROM cola_envios"))


@pytest.mark.parametrize("bad_line", [4, 400])
def test_csv_with_a_bad_byte_names_its_physical_line(
    bad_line: int, sqlite_db_url: str, tmp_path: Path
) -> None:
    lines = [HEADER, *_csv_lines(500)]
    lines[bad_line - 1] = f"x{bad_line},Jos\xe9 (Latin-1),+51911110000,Hola\n".encode("latin-1")
    path = tmp_path / "in.csv"
    path.write_bytes(b"".join(lines))
    proc = cola(tmp_path, "enqueue", "--session", "s", "--csv", str(path), COLA_DATABASE_URL=sqlite_db_url)
    assert_clear(proc, 2, f"line {bad_line}:", "UTF-8", "save")
    assert "line 1:" not in proc.stderr
    assert _count(sqlite_db_url) == 0  # nothing half written

    proc = cola(
        tmp_path,
        "enqueue",
        "--session",
        "s",
        "--csv",
        str(path),
        "--skip-invalid",
        COLA_DATABASE_URL=sqlite_db_url,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"line {bad_line}:" in proc.stdout
    assert _count(sqlite_db_url) == 499  # only the bad line is left out


def test_csv_bad_byte_inside_a_multi_line_record(sqlite_db_url: str, tmp_path: Path) -> None:
    body = (
        HEADER
        + b"".join(_csv_lines(3))
        + b'c9,Ana,+51911110009,"Hola\nse\xf1ora"\n'
        + b"".join(_csv_lines(2))
    )
    path = tmp_path / "in.csv"
    path.write_bytes(body)
    proc = cola(tmp_path, "enqueue", "--session", "s", "--csv", str(path), COLA_DATABASE_URL=sqlite_db_url)
    assert_clear(proc, 2, "line 6:", "UTF-8")  # the record starts on line 5; the byte is on line 6


def test_csv_bad_byte_in_the_header(sqlite_db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"cliente_id,tel\xe9fono,mensaje\n" + b"".join(_csv_lines(2)))
    proc = cola(tmp_path, "enqueue", "--session", "s", "--csv", str(path), COLA_DATABASE_URL=sqlite_db_url)
    assert_clear(proc, 2, "line 1:", "UTF-8", "save")


def test_jsonl_with_a_bad_byte_names_its_line(sqlite_db_url: str, tmp_path: Path) -> None:
    lines = [f'{{"telefono": "+5198765{i:04d}", "mensaje": "Hola {i}"}}\n'.encode() for i in range(300)]
    lines[249] = b'{"telefono": "+51911110000", "mensaje": "Se\xf1ora"}\n'
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    proc = cola(tmp_path, "enqueue", "--session", "s", "--jsonl", str(path), COLA_DATABASE_URL=sqlite_db_url)
    assert_clear(proc, 2, "line 250:", "UTF-8", "save")
    assert _count(sqlite_db_url) == 0


def test_stdin_with_a_bad_byte_names_its_line(sqlite_db_url: str, tmp_path: Path) -> None:
    lines = [HEADER, *_csv_lines(300)]
    lines[199] = b"x,Jos\xe9,+51911110000,Hola\n"
    base = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    base.update({"COLA_DATABASE_URL": sqlite_db_url})
    proc = subprocess.run(
        [*CLI, "enqueue", "--session", "s", "--csv", "-"],
        input=b"".join(lines),
        env=base,
        capture_output=True,
        timeout=120,
        check=False,
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert "line 200:" in stderr and "UTF-8" in stderr and "Traceback" not in stderr


# --- --version ----------------------------------------------------------------------


def test_version_comes_from_the_package_metadata(tmp_path: Path) -> None:
    expected = importlib.metadata.version("cola-worker")
    for command in (CLI, [sys.executable, "-m", "worker"]):
        proc = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"cola-worker {expected}"
    import worker

    assert worker.__version__ == expected
