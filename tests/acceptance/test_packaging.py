"""The package as users get it: a wheel carries the migrations, the console
command works, and plain `alembic upgrade head` works in a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import PROJECT


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            ".",
        ],
        cwd=PROJECT,
        check=True,
        capture_output=True,
    )
    [wheel] = list(dist.glob("cola_worker-*.whl"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    return site


def test_wheel_ships_the_migrations_and_db_upgrade_works_from_it(wheel_site: Path, tmp_path: Path) -> None:
    assert (wheel_site / "worker" / "migrations" / "versions" / "0001_initial.py").is_file()
    url = f"sqlite:///{tmp_path / 'w.db'}"
    # Run from a directory with no checkout, importing only the installed wheel.
    env = _env(PYTHONPATH=str(wheel_site), COLA_DATABASE_URL=url)
    where = subprocess.run(
        [sys.executable, "-c", "import worker, worker.migrations; print(worker.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(wheel_site))
    up = subprocess.run(
        [sys.executable, "-m", "worker", "db", "upgrade"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert up.returncode == 0, up.stderr
    current = subprocess.run(
        [sys.executable, "-m", "worker", "db", "current"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert current.returncode == 0, current.stderr
    assert "up to date" in current.stdout


def test_console_command_is_installed() -> None:
    exe = Path(sys.executable).with_name("cola-worker")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "enqueue" in proc.stdout and "run" in proc.stdout


def test_plain_alembic_upgrade_head_in_a_checkout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    alembic = Path(sys.executable).with_name("alembic")
    proc = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=PROJECT,
        env=_env(COLA_DATABASE_URL=url),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    check = subprocess.run(
        [str(alembic), "check"], cwd=PROJECT, env=_env(COLA_DATABASE_URL=url), capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_db_commands_report_missing_schema_and_bad_access(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "db", "current"],
        env=_env(COLA_DATABASE_URL=url),
        capture_output=True,
        text=True,
        cwd=PROJECT,
    )
    assert proc.returncode == 0 and "current: none" in proc.stdout and "behind" in proc.stdout
    denied = subprocess.run(
        [sys.executable, "-m", "worker", "status"],
        env=_env(COLA_DATABASE_URL="mysql+pymysql://nobody:wrong@127.0.0.1:3306/test"),
        capture_output=True,
        text=True,
        cwd=PROJECT,
    )
    assert denied.returncode == 2, denied.stderr
    assert "access denied" in denied.stderr and "wrong" not in denied.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "worker", "status"], env=_env(), capture_output=True, text=True, cwd=PROJECT
    )
    assert missing.returncode == 2 and "COLA_DATABASE_URL" in missing.stderr
