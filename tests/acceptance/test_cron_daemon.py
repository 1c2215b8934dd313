"""crontab.example's line under Debian's real cron daemon, for two minutes,
while a long manual run overlaps it: every message is sent once, and the
minutes that find the lock busy are silent (nothing for cron to mail)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import fresh_database
from support import PROJECT, cola_cmd, seed, states, wait_until, worker_env

from worker import db
from worker.sandbox import SandboxOptions, SandboxServer

REQUIRE_TOOLS = os.environ.get("COLA_TEST_REQUIRE_TOOLS") == "1"


def _cron_binary() -> str:
    cron = shutil.which("cron") or ("/usr/sbin/cron" if Path("/usr/sbin/cron").exists() else None)
    if cron is None:
        reason = "Debian's cron is not installed (apt-get install cron; .ci/run installs it)"
        if REQUIRE_TOOLS:
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("installing a system crontab (/etc/cron.d) needs root")
    return cron


def _running_cron_pid() -> int | None:
    try:
        pid = int(Path("/run/crond.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _cron_line() -> str:
    text = (PROJECT / "crontab.example").read_text()
    [line] = [line for line in text.splitlines() if line.startswith("* * * * *")]
    return line.split(None, 5)[5]


@pytest.mark.slow
def test_real_cron_every_minute_while_a_manual_run_overlaps(tmp_path: Path) -> None:
    cron = _cron_binary()
    fresh = fresh_database("mysql", tmp_path)
    engine = db.create_engine(fresh.url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    cron_file = Path("/etc/cron.d") / f"cola-worker-test-{uuid.uuid4().hex[:8]}"
    daemon: subprocess.Popen[bytes] | None = None
    manual: subprocess.Popen[bytes] | None = None
    server = SandboxServer(SandboxOptions(port=0, latency_ms=1000))
    server.start()
    try:
        total, manual_jobs = 150, 70
        seed(fresh.url, total)
        env = worker_env(fresh.url, tmp_path, provider="fake", fake_base_url=server.base_url, max_jobs=0)
        env_file = tmp_path / "cola-worker.env"
        env_file.write_text("".join(f"{k}='{v}'\n" for k, v in env.items() if k.startswith("COLA_")))
        env_file.chmod(0o600)
        logs = tmp_path / "log"
        logs.mkdir()
        mail = tmp_path / "mail.txt"  # what cron would have mailed: the job's own output
        mail.touch()
        command = _cron_line().replace("/etc/cola-worker.env", str(env_file))
        command = command.replace("/var/log/cola-worker", str(logs))

        # The long manual run first (one message a second), on the same lock file.
        with (tmp_path / "manual.log").open("w") as manual_log:
            manual = subprocess.Popen(
                cola_cmd("run", "--max-jobs", str(manual_jobs), "--concurrency", "1"),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=manual_log,
            )
        assert wait_until(lambda: states(fresh.url)["enviado"] >= 1, timeout=30)

        bindir = Path(sys.executable).parent
        cron_file.write_text(
            "SHELL=/bin/sh\n"
            f"PATH={bindir}:/usr/local/bin:/usr/bin:/bin\n"
            'MAILTO=""\n'
            f"* * * * * root ( {command} ) >>{mail} 2>&1\n"
        )
        cron_file.chmod(0o644)
        if _running_cron_pid() is None:
            daemon = subprocess.Popen([cron, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        assert manual.wait(timeout=240) == 0, (tmp_path / "manual.log").read_text()
        # The manual run spanned at least one minute boundary; the cron minutes
        # after it drain what it left.
        assert wait_until(lambda: states(fresh.url)["enviado"] == total, timeout=150, interval=1), states(
            fresh.url
        )
        time.sleep(2)  # let a run that just started finish writing its log
        run_log = (logs / "run.log").read_text()
        assert "another run holds the lock" in run_log, run_log  # a busy minute happened...
        assert mail.read_text() == "", mail.read_text()  # ...and nothing was mailed
        ledger = server.ledger()
        assert len(ledger) == total and len({e["job_id"] for e in ledger}) == total
        assert server.stats()["duplicates"] == {}
    finally:
        cron_file.unlink(missing_ok=True)
        if manual is not None and manual.poll() is None:
            manual.kill()
            manual.wait()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        server.stop()
        fresh.drop()
