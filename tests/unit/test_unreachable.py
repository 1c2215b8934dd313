"""A provider that cannot be reached: which transport errors mean "nothing was
sent, the provider is down", what the run writes for them, and what a row's
log line says about a retry."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from worker.providers.base import Retryable, SendRequest, Throttled
from worker.providers.meta import FakeProvider
from worker.queue import ClaimedRow
from worker.retry import RetryPolicy
from worker.runner import classify, outcome_label
from worker.schema import PENDIENTE
from worker.settings import load_settings

REQUEST = SendRequest(job_id="7", to="+51987654321", sender=None, kind="text", text="hola")
ROW = ClaimedRow(
    id=7,
    sesion_id=1,
    cliente_id="c7",
    cliente_nombre=None,
    telefono="+51987654321",
    remitente=None,
    tipo="text",
    payload={"text": "hola"},
    intentos=2,
    max_intentos=3,
)
POLICY = RetryPolicy(30.0, 3600.0)


def _provider(base_url: str, connect_timeout: float = 1.0) -> FakeProvider:
    settings = load_settings(
        environ={"COLA_FAKE_BASE_URL": base_url, "COLA_CONNECT_TIMEOUT": str(connect_timeout)}
    )
    provider = FakeProvider.from_settings(settings, max_connections=2)
    assert isinstance(provider, FakeProvider)
    return provider


@pytest.fixture
def refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A listening socket whose accept queue is full: a SYN is never answered."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.05)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()


def test_connection_refused_names_the_host(refusing_port: int) -> None:
    provider = _provider(f"http://127.0.0.1:{refusing_port}")
    try:
        result = provider.send(REQUEST)
    finally:
        provider.close()
    assert isinstance(result, Retryable)
    assert result.unreachable == f"127.0.0.1:{refusing_port}"
    assert result.text is not None and result.text.startswith("ConnectError")


def test_connect_timeout_names_the_host(unanswered_port: int) -> None:
    provider = _provider(f"http://127.0.0.1:{unanswered_port}", connect_timeout=0.2)
    try:
        result = provider.send(REQUEST)
    finally:
        provider.close()
    assert isinstance(result, Retryable)
    assert result.unreachable == f"127.0.0.1:{unanswered_port}"
    assert result.text is not None and result.text.startswith("ConnectTimeout")


def test_a_pool_timeout_is_not_an_unreachable_provider() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.PoolTimeout("no connection free", request=request)

    settings = load_settings(environ={"COLA_FAKE_BASE_URL": "http://127.0.0.1:1"})
    provider = FakeProvider.from_settings(settings, transport=httpx.MockTransport(handler))
    try:
        result = provider.send(REQUEST)
    finally:
        provider.close()
    assert isinstance(result, Retryable) and result.unreachable is None


def test_unreachable_spends_no_attempt_and_keeps_the_row_due() -> None:
    down = Retryable(text="ConnectError: [Errno 111] Connection refused", unreachable="10.0.0.1:443")
    outcome = classify(down, ROW, POLICY, 6.0)
    assert outcome.estado == PENDIENTE
    assert outcome.resultado == "unreachable"
    assert outcome.spend_attempt is False
    assert outcome.delay is None  # proximo_intento_at is left as it was
    # The same row one attempt from its limit: a plain retryable ends it.
    assert classify(Retryable(code="131000", text="temporary"), ROW, POLICY, 6.0).estado == "error"


def test_log_label_gives_the_reason_of_a_retry_with_phone_numbers_masked() -> None:
    row = dataclasses.replace(ROW, intentos=0)
    retry = classify(
        Retryable(code="21611", text="The 'To' number +51 987 654 321 is temporarily unavailable"),
        row,
        POLICY,
        6.0,
    )
    label = outcome_label(retry)
    assert label.startswith("pendiente (retryable: 21611 The 'To' number +51*****4321 is temporarily")
    assert "987 654" not in label and "next in" in label
    slow_down = Throttled("sender", 2.0, "130429", "Rate limit hit")
    throttled = outcome_label(classify(slow_down, row, POLICY, 6.0))
    assert "throttled: 130429 Rate limit hit" in throttled
    down = outcome_label(
        classify(Retryable(text="ConnectError: refused", unreachable="h:1"), row, POLICY, 6.0)
    )
    assert down == "pendiente (unreachable: ConnectError: refused; no attempt spent)"
    # A date is not a phone number.
    dated = outcome_label(classify(Retryable(code="1", text="retry after 2026-11-25"), row, POLICY, 6.0))
    assert "2026-11-25" in dated
