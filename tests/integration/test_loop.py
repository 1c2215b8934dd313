"""`run --loop`: stays up, polls, serves /metrics and /healthz, drains on SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
from support import free_port, kill_group, seed, start_worker, states, wait_until, worker_env

from worker.sandbox import SandboxOptions, SandboxServer


def test_loop_polls_serves_metrics_and_drains_on_sigterm(sqlite_db_url: str, tmp_path: Path) -> None:
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    port = free_port()
    try:
        seed(sqlite_db_url, 3)
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            poll_interval=0.2,
            metrics_port=port,
            max_jobs=1,  # ignored by --loop: it stays up
        )
        proc = start_worker(env, "run", "--loop", log=tmp_path / "loop.log")
        try:
            assert wait_until(lambda: states(sqlite_db_url)["enviado"] == 3, timeout=20)
            # Rows queued later are picked up by the next poll.
            seed(sqlite_db_url, 2, session="later", start=10)
            assert wait_until(lambda: states(sqlite_db_url)["enviado"] == 5, timeout=20)
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert health.status_code == 200
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert 'cola_messages_total{outcome="sent"} 5.0' in metrics
            assert proc.poll() is None
            kill_group(proc, signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            kill_group(proc)
    finally:
        server.stop()
    assert len(server.ledger()) == 5
