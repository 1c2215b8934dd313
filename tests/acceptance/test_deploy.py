"""Deployment: the container's entrypoint drains on SIGTERM, the compose file
and the Dockerfile only name what exists, host cron mails only failures, the
systemd units and the logrotate file are valid.

No Docker engine runs here, so the image's entrypoint command runs as a real
process tree (the user switch aside)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import PROJECT, cola_cmd, rows, seed, states, wait_until, worker_env

from worker import lock as file_lock
from worker.cli import build_parser
from worker.sandbox import SandboxOptions, SandboxServer
from worker.settings import OPTIONS

DOCKERFILE = (PROJECT / "Dockerfile").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
CRONTAB = (PROJECT / "crontab.example").read_text()


def _instruction(name: str) -> str:
    [line] = [line for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]
    return line[len(name) + 1 :].strip()


def _entrypoint() -> list[str]:
    entry = json.loads(_instruction("ENTRYPOINT"))
    assert isinstance(entry, list) and all(isinstance(x, str) for x in entry)
    return entry


def _cli_commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def _missing_tool(reason: str) -> None:
    if os.environ.get("COLA_TEST_REQUIRE_TOOLS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _known_variables() -> set[str]:
    names = {opt.env for opt in OPTIONS}
    return names | {opt.env + "_FILE" for opt in OPTIONS if opt.secret}


# --- the image ------------------------------------------------------------


def test_dockerfile_runs_the_scheduler_as_a_non_root_user_on_any_architecture() -> None:
    assert _entrypoint()[:2] == ["cola-worker", "schedule"]
    assert _instruction("FROM").startswith("python:3.11-slim")  # a multi-architecture base image
    user = _instruction("USER")
    assert user not in ("root", "0")
    # Nothing architecture-specific is downloaded (the old cron binary was amd64 only).
    instructions = "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#"))
    assert "amd64" not in instructions and "x86_64" not in instructions
    assert "curl" not in instructions and "supercronic" not in instructions
    for copied in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert (PROJECT / copied).exists(), copied
    for env_name in re.findall(r"\b(COLA_[A-Z_]+)=", DOCKERFILE):
        assert env_name in _known_variables(), env_name


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = (PROJECT / ".dockerignore").read_text().split()
    for heavy in (".git", ".venv", "tests", "bench", "secrets"):
        assert heavy in ignored, heavy


def test_compose_services_healthcheck_volumes_commands_and_variables() -> None:
    services = COMPOSE["services"]
    assert {"mysql", "migrate", "worker", "sandbox"} <= set(services)
    mysql = services["mysql"]
    assert mysql["image"].startswith("mysql:8.4")
    assert "mysqladmin" in mysql["healthcheck"]["test"]
    named = [v.split(":")[0] for v in mysql["volumes"]]
    assert named and all(n in COMPOSE["volumes"] for n in named)
    assert services["migrate"]["depends_on"]["mysql"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "./data:/data:ro" in worker["volumes"]
    # The outcome spool lives beside the lock file: it must outlive the container.
    lock_dir = str(Path(re.search(r"COLA_LOCK_FILE=(\S+)", DOCKERFILE).group(1)).parent)  # type: ignore[union-attr]
    [state] = [v for v in worker["volumes"] if v.split(":")[1] == lock_dir]
    assert state.split(":")[0] in COMPOSE["volumes"]
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace > 5 + 30  # connect + read timeout of the request in flight, with a margin

    commands = _cli_commands()
    for name, service in services.items():
        entry = service.get("entrypoint") or (_entrypoint() if service.get("build") else None)
        if entry is not None:
            assert entry[0] == "cola-worker" and entry[1] in commands, (name, entry)
        for var in service.get("environment") or {}:
            if var.startswith("COLA_"):
                assert var in _known_variables(), (name, var)
    # Secrets come from files that are not committed; an example of each is.
    ignored = (PROJECT / ".gitignore").read_text().split()
    assert "secrets/" in ignored
    for secret in COMPOSE["secrets"].values():
        path = Path(secret["file"])
        assert path.parts[0] == "secrets", path
        assert (PROJECT / "secrets.example" / path.name).is_file(), path


def test_readme_container_commands_name_services_compose_creates() -> None:
    readme = (PROJECT / "README.md").read_text()
    lines = re.findall(r"docker compose exec (?:-T )?(\S+) (\S+) (\S+)", readme)
    assert lines, "the README shows how to run a command in the container"
    for service, program, command in lines:
        assert service in COMPOSE["services"], service
        assert program == "cola-worker" and command in _cli_commands(), (program, command)
    assert not re.search(r"docker exec cola-worker\b", readme + CRONTAB)


# --- SIGTERM through the entrypoint drains the run ------------------------


def test_entrypoint_forwards_sigterm_and_the_run_drains(db_url: str, tmp_path: Path) -> None:
    seed(db_url, 60)
    server = SandboxServer(SandboxOptions(port=0, latency_ms=400))
    server.start()
    try:
        env = worker_env(
            db_url, tmp_path, provider="fake", fake_base_url=server.base_url, concurrency=4, max_jobs=0
        )
        entry = _entrypoint()
        assert entry[0] == "cola-worker"
        log = tmp_path / "container.log"
        with log.open("w") as out:
            top = subprocess.Popen(
                cola_cmd(*entry[1:]), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT
            )
        try:
            assert wait_until(lambda: states(db_url)["enviado"] >= 4, timeout=60), log.read_text()
            top.send_signal(signal.SIGTERM)  # what `docker stop` does to the container's top process
            code = top.wait(timeout=30)
        finally:
            if top.poll() is None:
                top.kill()
        output = log.read_text()
        assert code == 0, output
        assert "forwarded to run pid" in output
        final = rows(db_url)
        by_state = states(db_url)
        # Drained, not left to recovery: nothing claimed, the rest back untouched.
        assert by_state["procesando"] == 0 and by_state["enviando"] == 0, by_state
        assert 4 <= by_state["enviado"] < 60 and by_state["pendiente"] > 0, by_state
        assert all(r["intentos"] == 0 for r in final.values() if r["estado"] == "pendiente")
        ledger = server.ledger()
        assert len(ledger) == by_state["enviado"] == len({e["job_id"] for e in ledger})
        from support import scalar

        assert scalar(db_url, "SELECT COUNT(*) FROM ejecuciones WHERE estado <> 'terminada'") == 0
    finally:
        server.stop()


def test_schedule_starts_a_run_every_period_and_skips_while_one_is_going(
    sqlite_db_url: str, tmp_path: Path
) -> None:
    seed(sqlite_db_url, 3)
    server = SandboxServer(SandboxOptions(port=0, latency_ms=1500))  # a run outlasts the 1 s period
    server.start()
    try:
        env = worker_env(sqlite_db_url, tmp_path, provider="fake", fake_base_url=server.base_url)
        log = tmp_path / "schedule.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                cola_cmd("schedule", "--every", "1"), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            assert wait_until(lambda: log.read_text().count("exited 0") >= 3, timeout=60), log.read_text()
            assert "the previous run is still going; skipping" in log.read_text()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert states(sqlite_db_url)["enviado"] == 3 and len(server.ledger()) == 3
    finally:
        server.stop()


def test_schedule_rejects_a_bad_period(tmp_path: Path) -> None:
    proc = subprocess.run(cola_cmd("schedule", "--every", "0"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--every" in proc.stderr and "Traceback" not in proc.stderr


# --- host cron --------------------------------------------------------------


def _cron_run_line() -> str:
    [line] = [line for line in CRONTAB.splitlines() if line.startswith("* * * * *")]
    return line.split(None, 5)[5]


def _as_cron_would(command: str, env_file: Path, log_dir: Path) -> subprocess.CompletedProcess[str]:
    """The crontab's command with cron's empty environment (only the crontab's PATH and SHELL)."""
    command = command.replace("/etc/cola-worker.env", str(env_file)).replace(
        "/var/log/cola-worker", str(log_dir)
    )
    path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    return subprocess.run(
        ["env", "-i", f"PATH={path}", "SHELL=/bin/sh", "/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path


def test_crontab_line_is_silent_on_success_and_busy_lock_and_loud_on_failure(
    sqlite_db_url: str, tmp_path: Path
) -> None:
    seed(sqlite_db_url, 5)
    logs = tmp_path / "log"
    logs.mkdir()
    server = SandboxServer(SandboxOptions(port=0))
    server.start()
    try:
        env = {k: v for k, v in worker_env(sqlite_db_url, tmp_path).items() if k.startswith("COLA_")}
        env.update(COLA_PROVIDER="fake", COLA_FAKE_BASE_URL=server.base_url)
        good = _env_file(tmp_path / "good.env", env)
        ok = _as_cron_would(_cron_run_line(), good, logs)
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
        assert "run " in (logs / "run.log").read_text() and states(sqlite_db_url)["enviado"] == 5

        held = file_lock.acquire(env["COLA_LOCK_FILE"])
        assert isinstance(held, file_lock.FileLock)
        try:
            busy = _as_cron_would(_cron_run_line(), good, logs)
        finally:
            held.release()
        assert (busy.returncode, busy.stdout, busy.stderr) == (0, "", "")
        assert "another run holds the lock" in (logs / "run.log").read_text()
    finally:
        server.stop()

    bad = _env_file(tmp_path / "bad.env", {**env, "COLA_DATABASE_URL": "mysql+pymysql://u@127.0.0.1:1/x"})
    failed = _as_cron_would(_cron_run_line(), bad, logs)
    assert failed.returncode == 3, failed
    assert "database unreachable" in failed.stdout and "exited 3" in failed.stdout
    assert "Traceback" not in failed.stdout + failed.stderr


def test_cron_wrapper_says_when_its_log_file_cannot_be_written(tmp_path: Path) -> None:
    proc = subprocess.run(
        cola_cmd("cron", "--log-file", str(tmp_path / "missing" / "x.log"), "lock", "status"),
        env={**os.environ, "COLA_LOCK_FILE": str(tmp_path / "l" / "x.lock")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--log-file" in proc.stderr and "Traceback" not in proc.stderr


# --- systemd and logrotate --------------------------------------------------


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        _missing_tool("systemd-analyze is not installed (Debian: systemd)")
        return
    worker_bin = Path(sys.executable).parent / "cola-worker"
    for unit in ("cola-worker.service", "cola-worker.timer"):
        text = (PROJECT / "deploy" / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/cola-worker", str(worker_bin)))
    service = (PROJECT / "deploy" / "systemd" / "cola-worker.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.*)$", service, re.M)
    assert exec_start.split()[0].endswith("cola-worker") and exec_start.split()[1] in _cli_commands()
    assert "Type=oneshot" in service and "KillSignal=SIGTERM" in service
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / "cola-worker.service"), str(tmp_path / "cola-worker.timer")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "cola-worker" not in proc.stderr, proc.stderr


def test_logrotate_config_parses(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(logrotate).exists():
        _missing_tool("logrotate is not installed (Debian: logrotate)")
    text = (PROJECT / "deploy" / "logrotate").read_text()
    assert "/var/log/cola-worker/*.log" in text
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
    text = text.replace("/var/log/cola-worker", str(tmp_path)).replace("cola cola", f"{user} {user}")
    (tmp_path / "run.log").write_text("x\n")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    proc = subprocess.run(
        [logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "error" not in output.lower(), output
    assert "considering log" in output and "run.log" in output


def test_cron_wrapper_exits_with_the_commands_code(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        cola_cmd("cron", "enqueue", "--session", "x", "--to", "+51999000001", "--text", "hola"),
        env={k: v for k, v in os.environ.items() if not k.startswith("COLA_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "COLA_DATABASE_URL" in proc.stdout and "exited 2" in proc.stdout
    assert time.monotonic() - start < 30
