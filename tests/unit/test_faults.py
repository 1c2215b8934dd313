"""The test-only crash hook (worker/faults.py): off unless COLA_TEST_CRASH_AT
is set; when set, the N-th time a process reaches the point it dies by SIGKILL;
a malformed value is refused naming the variable; each point is placed once."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from support import PROJECT, cola_cmd

from worker import faults
from worker.errors import ConfigError
from worker.settings import CRASH_HOOK_ENV, crash_hook_spec


def test_the_variable_is_read_through_settings_and_empty_means_off() -> None:
    assert crash_hook_spec({}) is None
    assert crash_hook_spec({CRASH_HOOK_ENV: "  "}) is None
    assert crash_hook_spec({CRASH_HOOK_ENV: " after-fence:2 "}) == "after-fence:2"


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [(None, None), ("after-claim", ("after-claim", 1)), ("after-record:7", ("after-record", 7))],
)
def test_spec_is_a_point_and_an_optional_count(spec: str | None, parsed: tuple[str, int] | None) -> None:
    assert faults.parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["nowhere", "after-fence:0", "after-fence:x", "after-fence:", "AFTER-FENCE"])
def test_a_malformed_spec_names_the_variable(spec: str) -> None:
    with pytest.raises(ConfigError, match=CRASH_HOOK_ENV):
        faults.parse_spec(spec)


def test_off_by_default_every_point_is_a_no_op() -> None:
    # This process has no COLA_TEST_CRASH_AT (the test would die otherwise).
    assert crash_hook_spec() is None
    extensions: dict[str, object] = {}
    for point in faults.POINTS:
        for _ in range(3):
            faults.crash_point(point, 1)
        assert not faults.armed(point)
    faults.watch_request(extensions, 1)
    assert extensions == {}  # no trace callback on the hot path


def _python(code: str, spec: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", CRASH_HOOK_ENV: spec},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
    )


def test_dies_by_sigkill_the_nth_time_its_point_is_reached() -> None:
    code = (
        "from worker.faults import crash_point\n"
        "for job in range(1, 6):\n"
        "    crash_point('after-answer', job)\n"
        "    crash_point('after-fence', job)\n"
        "    print('passed', job, flush=True)\n"
    )
    proc = _python(code, "after-fence:3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split("\n") == ["passed 1", "passed 2", ""]  # other points do not count
    assert "test crash point after-fence reached (time 3, job 3): SIGKILL" in proc.stderr


def test_a_run_with_a_malformed_spec_exits_2_without_a_traceback(tmp_path: object) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "COLA_LOCK_FILE": f"{tmp_path}/run.lock",
        "COLA_DATABASE_URL": "sqlite:///:memory:",
        CRASH_HOOK_ENV: "after-lunch",
    }
    proc = subprocess.run(cola_cmd("run"), env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert proc.returncode == 2, proc.stderr
    assert CRASH_HOOK_ENV in proc.stderr and "after-lunch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_point_is_placed_exactly_once() -> None:
    runner = (PROJECT / "worker" / "runner.py").read_text()
    http = (PROJECT / "worker" / "providers" / "_http.py").read_text()
    placed = re.findall(r'crash_point\("([a-z-]+)"', runner)
    assert sorted(placed) == sorted(set(faults.POINTS) - {faults.AFTER_REQUEST})
    # after-request is inside the HTTP call: after the body is written, before the answer is read.
    assert http.count("faults.watch_request(") == 1


def test_after_request_fires_once_the_request_is_written_and_before_the_answer() -> None:
    """A server that reads the whole request and never answers: the client
    dies at once (not at its 20 s read timeout), and the server got every
    byte of the request (the hook fired after it was written, not before)."""
    got_request = threading.Event()
    release = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                while len(body) < length:
                    body += conn.recv(65536)
                got_request.set()
                release.wait(30)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        code = (
            "from worker.providers.registry import build_provider\n"
            "from worker.providers.base import SendRequest\n"
            "from worker.settings import load_settings\n"
            "provider = build_provider(load_settings(), max_connections=1)\n"
            "print(provider.send(SendRequest('42', '+51987654321', None, 'text', text='hola')))\n"
        )
        env = {
            "PATH": "/usr/bin:/bin",
            CRASH_HOOK_ENV: "after-request",
            "COLA_PROVIDER": "fake",
            "COLA_FAKE_BASE_URL": f"http://127.0.0.1:{port}",
            "COLA_READ_TIMEOUT": "20",
        }
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT
        )
        # The whole request reached the server (it may read it just after the client died).
        whole_request_arrived = got_request.wait(10)
        release.set()
        thread.join(5)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert whole_request_arrived
    assert "test crash point after-request reached (time 1, job 42)" in proc.stderr
