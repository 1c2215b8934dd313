"""The database dies in the middle of a run (G2, G3). Per docs/design.md section 8
the test kills only a private MariaDB server of its own, by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import _skip_or_fail
from support import free_port, run_worker, seed, start_worker, states, wait_until, worker_env

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer

MARIADBD = "/usr/sbin/mariadbd"


class PrivateMariaDB:
    """A throwaway mariadbd on a free port, in a directory of its own."""

    def __init__(self) -> None:
        if not (os.path.exists(MARIADBD) and shutil.which("mariadb-install-db")):
            _skip_or_fail("mariadbd / mariadb-install-db are not installed")
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
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        admin = db.parse_url(f"mysql+pymysql://root@127.0.0.1:{self.port}/")
        engine = sa.create_engine(admin, poolclass=sa.pool.NullPool)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("CREATE DATABASE IF NOT EXISTS cola"))
                    return
                except sa.exc.OperationalError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.2)
        finally:
            engine.dispose()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # only our own server, by its pid
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_mariadb() -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB()
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_database_killed_mid_run_nothing_sent_twice_nothing_lost(
    private_mariadb: PrivateMariaDB, tmp_path: Path
) -> None:
    url = private_mariadb.url
    engine = db.create_engine(url)
    db.upgrade(engine)
    engine.dispose()
    ids = seed(url, 30)
    sandbox = SandboxServer(SandboxOptions(port=0, latency_ms=300))
    sandbox.start()
    try:
        env = worker_env(
            url, tmp_path, provider="fake", fake_base_url=sandbox.base_url, concurrency=4, lease_seconds=2
        )
        run = start_worker(env, "run", "--batch-size", "10", log=tmp_path / "run.log")
        assert wait_until(lambda: states(url)["enviado"] >= 4, timeout=30)
        private_mariadb.kill()
        code = run.wait(timeout=60)
        log = (tmp_path / "run.log").read_text()
        assert code == 3, log[-2000:]  # database unreachable
        assert "unreachable" in log

        private_mariadb.start()  # same data directory: InnoDB crash recovery
        time.sleep(2.5)  # the dead run's lease runs out
        again = run_worker(env, "run", "--max-jobs", "0")
        assert again.returncode == 0, again.stderr
        assert "recovered 1 dead run(s)" in again.stderr
    finally:
        sandbox.stop()
    final = states(url)
    assert final["pendiente"] == final["procesando"] == final["enviando"] == 0, final
    assert final["enviado"] + final["incierto"] == 30
    ledger = Counter(e["job_id"] for e in sandbox.ledger())
    assert max(ledger.values()) == 1, "a message was sent twice"
    table_sent = {str(i) for i, r in _rows(url).items() if r == "enviado"}
    assert table_sent <= set(ledger)  # every row marked sent really was accepted
    assert set(ledger) <= {str(i) for i in ids}


def _rows(url: str) -> dict[int, str]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return {int(r[0]): r[1] for r in conn.execute(sa.text("SELECT id, estado FROM cola_envios"))}
    finally:
        engine.dispose()
