"""The sandbox (``cola-worker fake-provider``), driven over real sockets on
127.0.0.1 by the real ``fake`` provider: every fault gives the result class a
real client must see, and the ledger says what was really accepted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.errors import ConfigError
from worker.providers.base import (
    Accepted,
    Ambiguous,
    Permanent,
    Provider,
    Retryable,
    SenderBlocked,
    SendRequest,
    Throttled,
)
from worker.providers.meta import FakeProvider
from worker.sandbox import FAULT_KINDS, SandboxOptions, SandboxServer
from worker.settings import load_settings

StartSandbox = Callable[..., SandboxServer]
MakeClient = Callable[..., Provider]


def text(job_id: str, to: str = "+51900000001", sender: str | None = None) -> SendRequest:
    return SendRequest(job_id=job_id, to=to, sender=sender, kind="text", text="hola")


@pytest.fixture
def start_sandbox() -> Iterator[StartSandbox]:
    servers: list[SandboxServer] = []

    def start(**options: Any) -> SandboxServer:
        server = SandboxServer(SandboxOptions(port=0, **options))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    providers: list[Provider] = []

    def make(server: SandboxServer, *, max_connections: int = 4, **env: str) -> Provider:
        settings = load_settings(
            environ={"COLA_FAKE_BASE_URL": server.base_url, "COLA_READ_TIMEOUT": "5", **env}
        )
        provider = FakeProvider.from_settings(settings, max_connections=max_connections)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        provider.close()


def test_accepts_in_the_meta_shape_and_records_the_job(
    start_sandbox: StartSandbox, make_client: MakeClient
) -> None:
    server = start_sandbox()
    result = make_client(server).send(text("101", to="+51987654321"))
    assert isinstance(result, Accepted)
    assert result.message_id.startswith("wamid.")
    [entry] = server.ledger()
    assert entry["message_id"] == result.message_id
    assert entry["job_id"] == "101"
    assert entry["to"] == "51987654321"
    assert entry["phone_number_id"] == "sandbox"
    assert entry["type"] == "text"
    assert entry["ts"].endswith("+00:00")

    with httpx.Client() as client:
        raw = client.post(
            f"{server.base_url}/v21.0/555/messages",
            json={"messaging_product": "whatsapp", "to": "51911", "type": "text", "text": {"body": "x"}},
        )
    assert raw.status_code == 200
    body = raw.json()
    assert body["messaging_product"] == "whatsapp"
    assert body["contacts"] == [{"input": "51911", "wa_id": "51911"}]
    assert body["messages"][0]["id"].startswith("wamid.")


FAULT_EXPECTATIONS = [
    # kind, result class, accepted into the ledger, code, throttle scope
    ("fail-before", Retryable, False, "131000", None),
    ("fail-after", Ambiguous, True, None, None),
    ("stall-after", Ambiguous, True, None, None),
    ("reset-after", Ambiguous, True, None, None),
    ("reset-before", Ambiguous, False, None, None),
    ("throttle", Throttled, False, "130429", "sender"),
    ("pair-throttle", Throttled, False, "131056", "recipient"),
    ("invalid", Permanent, False, "131026", None),
]


def test_every_fault_kind_is_covered() -> None:
    assert sorted(k for k, *_ in FAULT_EXPECTATIONS) == sorted(FAULT_KINDS)


@pytest.mark.parametrize(("kind", "expected", "in_ledger", "code", "scope"), FAULT_EXPECTATIONS)
def test_fault_gives_the_result_a_real_client_must_see(
    start_sandbox: StartSandbox,
    make_client: MakeClient,
    kind: str,
    expected: type,
    in_ledger: bool,
    code: str | None,
    scope: str | None,
) -> None:
    server = start_sandbox(faults=(("+51900000009", kind),), stall_seconds=3)
    client = make_client(server, COLA_READ_TIMEOUT="0.3")
    started = time.monotonic()
    result = client.send(text("900", to="+51900000009"))
    assert type(result) is expected, result
    assert time.monotonic() - started < 2.5  # the stall is cut by the client's read timeout
    if code is not None:
        assert getattr(result, "code", None) == code
    if scope is not None:
        assert isinstance(result, Throttled) and result.scope == scope
    assert [e["job_id"] for e in server.ledger()] == (["900"] if in_ledger else [])
    # Other recipients are unaffected, on the same client.
    assert isinstance(client.send(text("901", to="+51900000010")), Accepted)
    assert server.stats()["outcomes"][kind] == 1


def test_faults_can_be_set_and_cleared_at_runtime(
    start_sandbox: StartSandbox, make_client: MakeClient
) -> None:
    server = start_sandbox()
    client = make_client(server)
    with httpx.Client() as admin:
        answer = admin.post(
            f"{server.base_url}/_sandbox/faults", json={"faults": {"+51900000001": "invalid"}}
        )
        assert answer.status_code == 200
        assert answer.json() == {"faults": {"51900000001": "invalid"}}
        assert isinstance(client.send(text("1")), Permanent)
        admin.post(f"{server.base_url}/_sandbox/faults", json={"faults": {"+51900000001": None}})
        assert isinstance(client.send(text("2")), Accepted)
        bad = admin.post(f"{server.base_url}/_sandbox/faults", json={"faults": {"+51900000001": "explode"}})
        assert bad.status_code == 400


def outcome_names(client: Provider, n: int) -> list[str]:
    return [type(client.send(text(str(i), to=f"+5190000{i:04d}"))).__name__ for i in range(n)]


def test_random_faults_are_reproducible_with_a_seed(
    start_sandbox: StartSandbox, make_client: MakeClient
) -> None:
    first = outcome_names(make_client(start_sandbox(seed=7, fail_before=0.3, invalid=0.3)), 30)
    second = outcome_names(make_client(start_sandbox(seed=7, fail_before=0.3, invalid=0.3)), 30)
    assert first == second
    assert {"Accepted", "Retryable", "Permanent"} <= set(first)

    always = start_sandbox(fail_before=1.0)
    assert set(outcome_names(make_client(always), 5)) == {"Retryable"}
    assert always.ledger() == []


def test_rate_limit_per_sender(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    server = start_sandbox(rate_limit=2)  # a token every 0.5 s: room for a slow machine
    client = make_client(server)
    results = [client.send(text(str(i), to=f"+519000000{i:02d}")) for i in range(5)]
    assert [type(r).__name__ for r in results[:2]] == ["Accepted"] * 2
    for r in results[2:]:
        assert isinstance(r, Throttled) and r.scope == "sender" and r.code == "130429"
        assert r.http_status == 429
    # Another phone number id has its own budget.
    assert isinstance(client.send(text("other", to="+51900000099", sender="222")), Accepted)
    time.sleep(0.6)  # refills at 2/s: one more token
    assert isinstance(client.send(text("later", to="+51900000098")), Accepted)
    stats = server.stats()
    assert stats["violations"]["rate_limit"] == 3
    assert stats["accepted"] == 4


def test_rate_limit_below_one_per_second_still_accepts_one(
    start_sandbox: StartSandbox, make_client: MakeClient
) -> None:
    client = make_client(start_sandbox(rate_limit=0.5))
    assert isinstance(client.send(text("1", to="+51900000001")), Accepted)
    assert isinstance(client.send(text("2", to="+51900000002")), Throttled)


def test_pair_interval_per_recipient(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    server = start_sandbox(pair_interval=1.0)
    client = make_client(server)
    assert isinstance(client.send(text("1", to="+51900000001")), Accepted)
    again = client.send(text("2", to="+51900000001"))
    assert isinstance(again, Throttled) and again.scope == "recipient" and again.code == "131056"
    assert isinstance(client.send(text("3", to="+51900000002")), Accepted)
    time.sleep(1.05)
    assert isinstance(client.send(text("4", to="+51900000001")), Accepted)
    assert server.stats()["violations"]["pair_interval"] == 1
    assert [e["job_id"] for e in server.ledger()] == ["1", "3", "4"]


def test_same_recipient_in_flight_twice_is_observed(
    start_sandbox: StartSandbox, make_client: MakeClient
) -> None:
    server = start_sandbox(latency_ms=300)
    client = make_client(server)
    threads = [
        threading.Thread(target=client.send, args=(text(str(i), to="+51900000001"),)) for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.stats()["violations"]["concurrent_recipient"] == 1


def test_ledger_file_is_appended_as_json_lines(
    start_sandbox: StartSandbox, make_client: MakeClient, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    server = start_sandbox(ledger=str(ledger), faults=(("+51900000003", "fail-before"),))
    client = make_client(server)
    for i in (1, 2, 3):
        client.send(text(str(i), to=f"+5190000000{i}"))
    server.stop()
    restarted = start_sandbox(ledger=str(ledger))  # a restart appends, never truncates
    make_client(restarted).send(text("4", to="+51900000004"))
    restarted.stop()
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [e["job_id"] for e in lines] == ["1", "2", "4"]
    assert {"ts", "message_id", "job_id", "to", "phone_number_id", "type"} <= set(lines[0])


def test_stats_report_duplicate_jobs(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    server = start_sandbox()
    client = make_client(server)
    client.send(text("77", to="+51900000001"))
    client.send(text("77", to="+51900000002"))
    client.send(text("78", to="+51900000003"))
    with httpx.Client() as admin:
        stats = admin.get(f"{server.base_url}/_sandbox/stats").json()
        ledger = admin.get(f"{server.base_url}/_sandbox/ledger").json()
    assert stats["duplicates"] == {"77": 2}
    assert stats["requests"] == 3 and stats["accepted"] == 3
    assert [e["job_id"] for e in ledger["messages"]] == ["77", "77", "78"]


def test_reset_clears_ledger_and_counters(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    server = start_sandbox(pair_interval=60)
    client = make_client(server)
    client.send(text("1"))
    with httpx.Client() as admin:
        assert admin.post(f"{server.base_url}/_sandbox/reset").status_code == 200
    assert server.ledger() == []
    assert server.stats()["requests"] == 0
    assert isinstance(client.send(text("2")), Accepted)  # the pair limit was reset too


def test_token_check(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    server = start_sandbox(token="right-token-123")
    wrong = make_client(server, COLA_META_TOKEN="wrong-token-456").send(text("1"))
    assert isinstance(wrong, SenderBlocked) and wrong.code == "190" and wrong.http_status == 401
    assert server.ledger() == []
    right = make_client(server, COLA_META_TOKEN="right-token-123").send(text("2"))
    assert isinstance(right, Accepted)
    assert server.stats()["outcomes"]["unauthorized"] == 1


def test_malformed_request_is_meta_error_100(start_sandbox: StartSandbox) -> None:
    server = start_sandbox()
    with httpx.Client() as client:
        answer = client.post(f"{server.base_url}/v21.0/1/messages", content=b"{not json")
        missing_to = client.post(
            f"{server.base_url}/v21.0/1/messages", json={"messaging_product": "whatsapp"}
        )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 100
    assert missing_to.status_code == 400 and missing_to.json()["error"]["code"] == 100
    assert server.ledger() == []


def test_latency_is_added(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    client = make_client(start_sandbox(latency_ms=150))
    started = time.monotonic()
    assert isinstance(client.send(text("1")), Accepted)
    assert time.monotonic() - started >= 0.14


@pytest.mark.parametrize("pool", [2, 6])
def test_provider_pool_bounds_requests_in_flight(
    start_sandbox: StartSandbox, make_client: MakeClient, pool: int
) -> None:
    server = start_sandbox(latency_ms=300)
    client = make_client(server, max_connections=pool)
    threads = [
        threading.Thread(target=client.send, args=(text(str(i), to=f"+519000000{i:02d}"),)) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.stats()["accepted"] == 8
    assert server.stats()["max_in_flight"] == pool


def test_stop_does_not_wait_for_stalled_answers(start_sandbox: StartSandbox, make_client: MakeClient) -> None:
    server = start_sandbox(stall_after=1.0, stall_seconds=30)
    assert isinstance(make_client(server, COLA_READ_TIMEOUT="0.2").send(text("1")), Ambiguous)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "options",
    [
        {"fail_before": 1.5},
        {"fail_before": 0.6, "fail_after": 0.6},
        {"faults": (("+5190", "explode"),)},
        {"port": 70000},
        {"latency_ms": -1},
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SandboxOptions(**options)


FAULT_FLAG = ("--fault", "+51900000002=invalid")


def test_command_line_serves_until_sigterm(tmp_path: Path, make_client: MakeClient) -> None:
    ledger = tmp_path / "cli-ledger.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox", "--port", "0", "--ledger", str(ledger), *FAULT_FLAG],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stderr is not None
        url = None
        for _ in range(5):
            line = proc.stderr.readline()
            if "listening on" in line:
                url = line.rsplit(" ", 1)[-1].strip()
                break
        assert url is not None and url.startswith("http://127.0.0.1:")

        class Running:
            base_url = url

        client = make_client(Running())  # type: ignore[arg-type]
        assert isinstance(client.send(text("1", to="+51900000001")), Accepted)
        assert isinstance(client.send(text("2", to="+51900000002")), Permanent)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert "1 accepted" in rest
    assert [json.loads(line)["job_id"] for line in ledger.read_text().splitlines()] == ["1"]


class _Collector:
    """A local receiver of the sandbox's status webhooks: answers 500 to the
    first ``fail_first`` requests, then 200; keeps what it got."""

    def __init__(self, fail_first: int) -> None:
        import http.server
        import threading

        self.fail_first = fail_first
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with collector.lock:
                    collector.got.append((dict(self.headers), body))
                    status = 500 if len(collector.got) <= collector.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/meta"

    def statuses(self) -> list[dict[str, object]]:
        import json

        with self.lock:
            got = list(self.got[self.fail_first :])
        out: list[dict[str, object]] = []
        for _, body in got:
            for entry in json.loads(body)["entry"]:
                for change in entry["changes"]:
                    out.extend(change["value"]["statuses"])
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_status_webhooks_are_signed_complete_and_retried(
    start_sandbox: StartSandbox, make_client: MakeClient
) -> None:
    from worker.web.signing import META_HEADER, verify_hmac_sha256

    collector = _Collector(fail_first=2)
    try:
        server = start_sandbox(
            faults=(("+51900000003", "reset-before"),),
            receipts_url=collector.url,
            receipts_secret="s3",
            receipts_failed=0.5,
            receipts_duplicate=1.0,
            seed=3,
        )
        client = make_client(server)
        results = [client.send(text(str(i), to=f"+5190000000{i}")) for i in range(1, 5)]
        accepted = {r.message_id: str(i) for i, r in enumerate(results, start=1) if isinstance(r, Accepted)}
        assert len(accepted) == 3  # job 3 was reset before accepting: no webhook for it

        def done() -> bool:
            stats = server.stats()["receipts"]
            return stats["pending"] == 0 and stats["delivered"] == stats["scheduled"]

        deadline = time.monotonic() + 20
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done(), server.stats()["receipts"]
        stats = server.stats()["receipts"]
        assert stats["retries"] >= 2 and stats["dropped"] == 0
        with collector.lock:
            for headers, body in collector.got:
                assert verify_hmac_sha256("s3", body, headers[META_HEADER])
        statuses = collector.statuses()
        by_message: dict[object, list[object]] = {}
        for st in statuses:
            assert st["biz_opaque_callback_data"] == accepted[st["id"]]
            by_message.setdefault(st["id"], []).append(st["status"])
        assert set(by_message) == set(accepted)
        failed = 0
        for words in by_message.values():
            distinct = set(words)
            assert distinct in ({"sent", "delivered", "read"}, {"sent", "failed"}), words
            assert len(words) == len(distinct) + 1  # every message had one status duplicated
            failed += "failed" in distinct
        codes = {e["code"] for st in statuses if st["status"] == "failed" for e in st["errors"]}
        assert codes <= {131026, 131049} and bool(codes) == bool(failed)
    finally:
        collector.close()
