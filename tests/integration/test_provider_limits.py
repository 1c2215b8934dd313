"""G5 and G7 end to end: a run against the sandbox's own rate and pair limits,
and secrets kept out of every output."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from pathlib import Path

from support import phone, run_worker, scalar, seed, states, worker_env

from worker.sandbox import SandboxOptions, SandboxServer


def _ledger(server: SandboxServer) -> Counter[str]:
    return Counter(e["job_id"] for e in server.ledger())


def _drain(env: dict[str, str], url: str, runs: int = 15) -> str:
    """Run until nothing is pendiente (throttled rows come back a little later)."""
    logs = ""
    for _ in range(runs):
        proc = run_worker(env, "run", "--max-jobs", "0")
        assert proc.returncode == 0, proc.stderr
        logs += proc.stderr
        if states(url)["pendiente"] == 0:
            return logs
        time.sleep(1.1)
    raise AssertionError(f"queue not drained: {states(url)}")


def test_run_under_the_sandbox_limits_is_never_throttled(sqlite_db_url: str, tmp_path: Path) -> None:
    server = SandboxServer(SandboxOptions(port=0, rate_limit=20, pair_interval=1.0, latency_ms=20))
    server.start()
    try:
        recipients = [phone(k) for k in range(8)]
        ids = seed(sqlite_db_url, 32, recipients=recipients)  # 4 messages to each recipient
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            rate_limit=15,
            pair_interval=1.1,
            concurrency=8,
        )
        started = time.monotonic()
        proc = run_worker(env, "run", "--max-jobs", "0")
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        stats = server.stats()
        assert stats["outcomes"] == {"ok": 32}, stats["outcomes"]
        assert stats["violations"] == {"rate_limit": 0, "pair_interval": 0, "concurrent_recipient": 0}
        assert _ledger(server) == Counter({str(i): 1 for i in ids})
        assert states(sqlite_db_url) == Counter({"enviado": 32})
        assert elapsed >= 3 * 1.1  # the 4th message to a recipient waited three pair intervals
    finally:
        server.stop()


def test_run_above_the_sandbox_rate_slows_down_and_sends_each_once(
    sqlite_db_url: str, tmp_path: Path
) -> None:
    server = SandboxServer(SandboxOptions(port=0, rate_limit=10))
    server.start()
    try:
        ids = seed(sqlite_db_url, 60)
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            rate_limit=200,
            concurrency=8,
        )
        logs = _drain(env, sqlite_db_url)
        assert server.stats()["outcomes"].get("rate-limited", 0) > 0
        assert "throttled the sender" in logs and "rate now" in logs
        assert _ledger(server) == Counter({str(i): 1 for i in ids})
        assert states(sqlite_db_url) == Counter({"enviado": 60})
        throttled = scalar(sqlite_db_url, "SELECT COUNT(*) FROM intentos_envio WHERE resultado = 'throttled'")
        assert throttled > 0
        # A throttle spends no attempt: every row was accepted on its one counted attempt.
        assert scalar(sqlite_db_url, "SELECT MAX(intentos) FROM cola_envios") == 1
    finally:
        server.stop()


def test_run_above_the_sandbox_pair_limit_reschedules_and_sends_each_once(
    sqlite_db_url: str, tmp_path: Path
) -> None:
    server = SandboxServer(SandboxOptions(port=0, pair_interval=1.0))
    server.start()
    try:
        ids = seed(sqlite_db_url, 6, recipients=[phone(1), phone(2)])
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            pair_interval=0,
            concurrency=4,
        )
        _drain(env, sqlite_db_url, runs=20)
        assert _ledger(server) == Counter({str(i): 1 for i in ids})
        assert scalar(sqlite_db_url, "SELECT COUNT(*) FROM intentos_envio WHERE codigo = '131056'") > 0
        assert scalar(sqlite_db_url, "SELECT MAX(intentos) FROM cola_envios") == 1
        # Never two in flight to one recipient, even with the pair interval off.
        assert server.stats()["violations"]["concurrent_recipient"] == 0
    finally:
        server.stop()


def test_secrets_never_appear_in_any_output(sqlite_db_url: str, tmp_path: Path) -> None:
    token = "EAAG-known-t0ken-1234567890"
    server = SandboxServer(SandboxOptions(port=0, token="the-real-one"))
    server.start()
    try:
        seed(sqlite_db_url, 2)
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="meta",
            meta_base_url=server.base_url,
            meta_phone_number_id="12345",
            log_level="DEBUG",
        )
        env["COLA_META_TOKEN_FILE"] = str(token_file)
        outputs = []
        for args in (("run",), ("run", "--log-format", "json"), ("run", "--help"), ("status", "--json")):
            proc = run_worker(env, *args)
            outputs.append(proc.stdout + proc.stderr)
        assert outputs[0] and "blocked the sender" in outputs[0]
        for out in outputs:
            assert token not in out
        stored = (
            scalar(sqlite_db_url, "SELECT GROUP_CONCAT(COALESCE(error_texto, '')) FROM cola_envios") or ""
        )
        assert token not in stored
        db_secret = "hunter2"
        env["COLA_DATABASE_URL"] = f"mysql+pymysql://u:{db_secret}@127.0.0.1:1/x"
        proc = run_worker(env, "run")
        assert proc.returncode == 3, proc.stderr
        assert db_secret not in proc.stdout + proc.stderr
    finally:
        server.stop()


def _arrivals(server: SandboxServer) -> list[float]:
    """When the sandbox decided each accepted request (its clock), seconds, sorted."""
    return sorted(dt.datetime.fromisoformat(e["ts"]).timestamp() for e in server.ledger())


def _busiest_window(times: list[float], width: float) -> int:
    """The most arrivals in any half-open window ``[t, t + width)`` starting at an arrival."""
    return max(sum(1 for u in times[i:] if u < t + width) for i, t in enumerate(times))


def test_the_configured_rate_is_kept_end_to_end(sqlite_db_url: str, tmp_path: Path) -> None:
    """G5, the rate alone: distinct recipients (the pair interval never applies),
    no limit in the sandbox, and a run that could go far faster than the rate.
    The sandbox's own arrival times show the spacing the worker kept."""
    rate, n = 8, 40
    server = SandboxServer(SandboxOptions(port=0, latency_ms=10))
    server.start()
    try:
        ids = seed(sqlite_db_url, n)  # n distinct recipients
        env = worker_env(
            sqlite_db_url,
            tmp_path,
            provider="fake",
            fake_base_url=server.base_url,
            rate_limit=rate,
            pair_interval=6,
            concurrency=16,
        )
        proc = run_worker(env, "run", "--max-jobs", "0")
        assert proc.returncode == 0, proc.stderr
        assert _ledger(server) == Counter({str(i): 1 for i in ids})
        times = _arrivals(server)
        # A token bucket of capacity one: no window of 1 s (or 2 s) holds more than
        # rate * width + 1 arrivals; one more is allowed for scheduling jitter.
        for width in (1.0, 2.0):
            busiest = _busiest_window(times, width)
            assert busiest <= rate * width + 2, (width, busiest, times)
        overall = (n - 1) / (times[-1] - times[0])
        assert 0.75 * rate <= overall <= 1.1 * rate, overall
    finally:
        server.stop()
