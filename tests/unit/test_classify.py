"""docs/design.md section 4: the provider's result, and only it, decides the row."""

from __future__ import annotations

import pytest

from worker.providers.base import Accepted, Ambiguous, Permanent, Retryable, SenderBlocked, Throttled
from worker.queue import ClaimedRow
from worker.retry import RetryPolicy
from worker.runner import classify
from worker.schema import ENVIADO, ERROR, INCIERTO, PENDIENTE

POLICY = RetryPolicy(base=30.0, cap=3600.0)


def row(intentos: int = 0, max_intentos: int = 3) -> ClaimedRow:
    return ClaimedRow(
        id=42,
        sesion_id=1,
        cliente_id="c1",
        cliente_nombre="Cliente",
        telefono="+51987654321",
        remitente=None,
        tipo="text",
        payload={"text": "hola"},
        intentos=intentos,
        max_intentos=max_intentos,
    )


def test_accepted_is_enviado_and_spends_an_attempt() -> None:
    out = classify(Accepted("wamid.ABC", http_status=200), row(), POLICY, 6.0)
    assert out.estado == ENVIADO
    assert out.resultado == "accepted"
    assert out.spend_attempt is True
    assert out.message_id == "wamid.ABC"
    assert out.http_status == 200
    assert out.delay is None


def test_accepted_on_the_last_attempt_is_still_enviado() -> None:
    out = classify(Accepted("wamid.LAST"), row(intentos=2, max_intentos=3), POLICY, 6.0)
    assert out.estado == ENVIADO


@pytest.mark.parametrize("retry_after", [None, 0.0, 0.5, 3.0, 120.0])
def test_sender_throttle_is_pendiente_without_spending_an_attempt(retry_after: float | None) -> None:
    result = Throttled("sender", retry_after=retry_after, code="130429", text="rate limit", http_status=429)
    out = classify(result, row(), POLICY, 6.0)
    assert out.estado == PENDIENTE
    assert out.resultado == "throttled"
    assert out.spend_attempt is False
    assert out.delay is not None
    assert out.delay >= 1.0  # floor
    assert out.delay >= (retry_after or 0.0)
    assert out.code == "130429" and out.http_status == 429


@pytest.mark.parametrize(
    ("retry_after", "pair_interval", "at_least"),
    [(None, 6.0, 6.0), (None, 0.0, 6.0), (2.0, 6.0, 6.0), (None, 15.0, 15.0), (90.0, 6.0, 90.0)],
)
def test_recipient_throttle_waits_at_least_the_pair_interval(
    retry_after: float | None, pair_interval: float, at_least: float
) -> None:
    result = Throttled("recipient", retry_after=retry_after, code="131056", text="pair rate limit")
    out = classify(result, row(), POLICY, pair_interval)
    assert out.estado == PENDIENTE
    assert out.spend_attempt is False
    assert out.delay is not None and out.delay >= at_least
    assert out.code == "131056"


def test_throttle_on_the_last_attempt_does_not_end_in_error() -> None:
    out = classify(Throttled("sender", code="20429"), row(intentos=2, max_intentos=3), POLICY, 6.0)
    assert out.estado == PENDIENTE and out.spend_attempt is False


@pytest.mark.parametrize(("intentos", "low", "high"), [(0, 15.0, 30.0), (1, 30.0, 60.0), (3, 120.0, 240.0)])
def test_retryable_backs_off_and_spends_an_attempt(intentos: int, low: float, high: float) -> None:
    for _ in range(50):
        out = classify(
            Retryable(code="131000", text="try later", http_status=500), row(intentos, 10), POLICY, 6.0
        )
        assert out.estado == PENDIENTE
        assert out.resultado == "retryable"
        assert out.spend_attempt is True
        assert out.delay is not None and low <= out.delay <= high
        assert out.code == "131000" and out.text == "try later"


def test_retryable_honours_a_longer_retry_after() -> None:
    out = classify(Retryable(code="1", retry_after=600.0), row(0, 5), POLICY, 6.0)
    assert out.estado == PENDIENTE
    assert out.delay is not None and out.delay >= 600.0


def test_retryable_with_attempts_spent_is_error() -> None:
    out = classify(Retryable(code="131000", text="temporary", http_status=500), row(2, 3), POLICY, 6.0)
    assert out.estado == ERROR
    assert out.spend_attempt is True
    assert out.code == "131000"
    assert out.text is not None and "3/3" in out.text and "temporary" in out.text
    assert out.delay is None


def test_retryable_with_one_attempt_allowed_is_error_at_once() -> None:
    out = classify(Retryable(text="connect error"), row(0, 1), POLICY, 6.0)
    assert out.estado == ERROR


def test_retryable_one_before_the_last_attempt_is_retried() -> None:
    out = classify(Retryable(text="connect error"), row(1, 3), POLICY, 6.0)
    assert out.estado == PENDIENTE


@pytest.mark.parametrize("code", ["131026", "131047", "132001", "21211", "63016"])
def test_permanent_is_error_with_code_and_text(code: str) -> None:
    out = classify(Permanent(code, "invalid recipient", http_status=400), row(), POLICY, 6.0)
    assert out.estado == ERROR
    assert out.resultado == "permanent"
    assert out.spend_attempt is True
    assert out.code == code and out.text == "invalid recipient" and out.http_status == 400
    assert out.delay is None


def test_permanent_on_the_first_attempt_is_not_retried() -> None:
    out = classify(Permanent(None, "bad parameters"), row(0, 5), POLICY, 6.0)
    assert out.estado == ERROR


@pytest.mark.parametrize("text", ["read timeout", "connection reset", "HTTP 502 without an error body"])
def test_ambiguous_is_incierto(text: str) -> None:
    out = classify(Ambiguous(text, http_status=502), row(), POLICY, 6.0)
    assert out.estado == INCIERTO
    assert out.resultado == "ambiguous"
    assert out.text == text
    assert out.delay is None


def test_ambiguous_with_attempts_left_is_never_retried() -> None:
    out = classify(Ambiguous("read timeout"), row(0, 10), POLICY, 6.0)
    assert out.estado == INCIERTO and out.estado != PENDIENTE


def test_sender_blocked_leaves_the_row_pendiente_untouched() -> None:
    out = classify(SenderBlocked("190", "token expired", http_status=401), row(1, 3), POLICY, 6.0)
    assert out.estado == PENDIENTE
    assert out.resultado == "sender_blocked"
    assert out.spend_attempt is False
    assert out.delay is None
    assert out.code == "190"


def test_sender_blocked_on_the_last_attempt_is_not_error() -> None:
    out = classify(SenderBlocked("131031", "account locked"), row(2, 3), POLICY, 6.0)
    assert out.estado == PENDIENTE and out.spend_attempt is False
