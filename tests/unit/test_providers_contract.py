"""One contract, every provider: :class:`ProviderContract` holds the shared
tests; each subclass supplies how its provider is built, what its answers
look like and its own code table (parametrized by ``pytest_generate_tests``).
All traffic goes to ``httpx.MockTransport``: no network."""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs

import httpx
import pytest

from worker.providers.base import (
    Accepted,
    Ambiguous,
    Permanent,
    Provider,
    Retryable,
    SenderBlocked,
    SendRequest,
    SendResult,
    Throttled,
)
from worker.providers.meta import FakeProvider, MetaProvider
from worker.providers.twilio import TwilioProvider
from worker.providers.webhook import WebhookProvider
from worker.settings import Settings, load_settings

TOKEN = "EAAG-super-SECRET-token-0123456789"
BASE = "https://provider.test"
PHONE = "+51987654321"
MASKED = "+51*****4321"

TEXT = SendRequest(job_id="4242", to=PHONE, sender=None, kind="text", text="Hola Ana")
TEMPLATE = SendRequest(
    job_id="4243",
    to=PHONE,
    sender=None,
    kind="template",
    template="recordatorio_cita",
    language="es",
    params=("Ana", "lunes 10:00"),
)

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    body: Any  # JSON-able, or bytes for a raw body, or None for no body
    expected: type
    code: str | None = None
    scope: str | None = None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.cls is not None and "code_case" in metafunc.fixturenames:
        cases = metafunc.cls.CODE_CASES
        metafunc.parametrize("code_case", cases, ids=[c.id for c in cases])


def response_for(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers)
    if isinstance(body, bytes):
        return httpx.Response(status, content=body, headers={"Content-Type": "text/html", **(headers or {})})
    return httpx.Response(status, json=body, headers=headers)


TRANSPORT_ERRORS = [
    (httpx.ConnectError, Retryable),
    (httpx.ConnectTimeout, Retryable),
    (httpx.PoolTimeout, Retryable),
    (httpx.ReadTimeout, Ambiguous),
    (httpx.WriteTimeout, Ambiguous),
    (httpx.RemoteProtocolError, Ambiguous),
    (httpx.ReadError, Ambiguous),
    (httpx.WriteError, Ambiguous),
]


# Error classes a provider body can name; each must lose to a 2xx status.
ERROR_KINDS = ["retryable", "throttled", "permanent", "blocked"]


class ProviderContract:
    """The shared tests. Subclasses fill in the hooks below."""

    CODE_CASES: ClassVar[list[Case]] = []
    ENV: ClassVar[dict[str, str]] = {}
    SENDER: ClassVar[str] = "+15550001111"  # what a row's sender looks like for this provider
    provider_class: ClassVar[type[Provider]]

    # -- hooks ---------------------------------------------------------------

    def ok_response(self, request: httpx.Request, n: int | None = None) -> httpx.Response:
        """Success; the message id is ``msg-<job id>``, or ``msg-<n>`` when n is given."""
        raise NotImplementedError

    def no_id_response(self) -> httpx.Response:
        raise NotImplementedError

    def error_response(self, status: int, code: int | str, message: str) -> httpx.Response:
        raise NotImplementedError

    def ok_with_error_response(self, kind: str, with_id: bool) -> httpx.Response:
        """A 2xx whose body carries this provider's error of ``kind`` (one of
        ERROR_KINDS) next to the message id ``msg-4242`` (or without any id)."""
        raise NotImplementedError

    def check_text_request(self, request: httpx.Request) -> None:
        raise NotImplementedError

    def check_template_request(self, request: httpx.Request) -> None:
        raise NotImplementedError

    def check_sender(self, request: httpx.Request, sender: str) -> None:
        raise NotImplementedError

    def check_auth(self, request: httpx.Request) -> None:
        raise NotImplementedError

    # -- plumbing --------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _close_providers(self) -> Any:
        self.opened: list[Provider] = []
        yield
        for provider in self.opened:
            provider.close()

    def settings(self, **extra: str) -> Settings:
        return load_settings(environ={**self.ENV, **extra})

    def make(self, handler: Handler, **env: str) -> Provider:
        build = self.provider_class.from_settings  # type: ignore[attr-defined]
        provider: Provider = build(
            self.settings(**env), max_connections=4, transport=httpx.MockTransport(handler)
        )
        self.opened.append(provider)
        return provider

    def send_one(self, response: httpx.Response | Handler, request: SendRequest = TEXT) -> SendResult:
        handler = response if callable(response) else (lambda _req: response)
        return self.make(handler).send(request)

    # -- the contract ----------------------------------------------------------

    def test_accepted_carries_the_provider_message_id(self) -> None:
        result = self.send_one(self.ok_response)
        assert isinstance(result, Accepted)
        assert result.message_id == "msg-4242"
        assert result.http_status is not None and 200 <= result.http_status < 300

    def test_text_request_shape(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        assert isinstance(self.make(handler).send(TEXT), Accepted)
        assert len(seen) == 1
        assert seen[0].method == "POST"
        self.check_auth(seen[0])
        self.check_text_request(seen[0])

    def test_template_request_shape(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        assert isinstance(self.make(handler).send(TEMPLATE), Accepted)
        self.check_auth(seen[0])
        self.check_template_request(seen[0])

    def test_request_sender_overrides_the_default(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        request = SendRequest(job_id="7", to=PHONE, sender=self.SENDER, kind="text", text="x")
        assert isinstance(self.make(handler).send(request), Accepted)
        self.check_sender(seen[0], self.SENDER)

    def test_timeouts_come_from_settings(self) -> None:
        seen: list[dict[str, float]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.extensions["timeout"])
            return self.ok_response(request)

        self.make(handler, COLA_CONNECT_TIMEOUT="1.5", COLA_READ_TIMEOUT="7").send(TEXT)
        assert seen[0]["connect"] == 1.5
        assert seen[0]["read"] == 7.0
        assert seen[0]["write"] == 7.0
        assert seen[0]["pool"] == 8.5

    def test_2xx_without_message_id_is_ambiguous(self) -> None:
        result = self.send_one(self.no_id_response())
        assert isinstance(result, Ambiguous)

    @pytest.mark.parametrize("kind", ERROR_KINDS)
    def test_2xx_with_a_message_id_is_accepted_whatever_else_the_body_says(self, kind: str) -> None:
        # The provider took the message: sending it again would be a duplicate.
        result = self.send_one(self.ok_with_error_response(kind, with_id=True))
        assert isinstance(result, Accepted), result
        assert result.message_id == "msg-4242"

    @pytest.mark.parametrize("kind", ERROR_KINDS)
    def test_2xx_without_a_message_id_is_ambiguous_whatever_error_the_body_carries(self, kind: str) -> None:
        # A 2xx may mean the provider took it: never retryable, throttled or permanent.
        result = self.send_one(self.ok_with_error_response(kind, with_id=False))
        assert isinstance(result, Ambiguous), result
        assert result.http_status is not None and 200 <= result.http_status < 300

    @pytest.mark.parametrize("status", [200, 201, 202, 204])
    def test_any_2xx_status_without_an_id_is_ambiguous(self, status: int) -> None:
        result = self.send_one(response_for(status, None if status == 204 else {}))
        assert isinstance(result, Ambiguous), result
        assert result.http_status == status

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    @pytest.mark.parametrize("body", [None, b"<html>Bad Gateway</html>"], ids=["empty", "html"])
    def test_5xx_without_a_provider_error_body_is_ambiguous(self, status: int, body: bytes | None) -> None:
        result = self.send_one(response_for(status, body))
        assert isinstance(result, Ambiguous)
        assert result.http_status == status

    def test_mapped_code(self, code_case: Case) -> None:
        result = self.send_one(response_for(code_case.status, code_case.body))
        assert type(result) is code_case.expected, result
        assert getattr(result, "http_status", None) == code_case.status
        if code_case.code is not None:
            assert getattr(result, "code", None) == code_case.code
        if code_case.scope is not None:
            assert isinstance(result, Throttled) and result.scope == code_case.scope

    def test_429_without_body_is_a_sender_throttle_honouring_retry_after(self) -> None:
        result = self.send_one(httpx.Response(429, headers={"Retry-After": "7"}))
        assert isinstance(result, Throttled)
        assert result.scope == "sender"
        assert result.retry_after == 7.0

    def test_retry_after_as_http_date(self) -> None:
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        result = self.send_one(httpx.Response(429, headers={"Retry-After": when}))
        assert isinstance(result, Throttled)
        assert result.retry_after is not None and 25 <= result.retry_after <= 31

    @pytest.mark.parametrize(
        ("error", "expected"), TRANSPORT_ERRORS, ids=[e.__name__ for e, _ in TRANSPORT_ERRORS]
    )
    def test_transport_error(self, error: type[httpx.TransportError], expected: type) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise error("boom", request=request)

        result = self.send_one(handler)
        assert type(result) is expected
        assert error.__name__ in str(result)

    def test_unexpected_exception_in_flight_is_ambiguous(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise RuntimeError("something odd after the request left")

        assert isinstance(self.send_one(handler), Ambiguous)

    def test_token_never_appears_in_results_or_repr(self) -> None:
        leaky = f"bad token {TOKEN} for this sender"
        answers: list[httpx.Response | Handler] = [
            self.error_response(400, 131026, leaky),
            self.error_response(401, 190, leaky),
            self.error_response(500, 131000, leaky),
            self.error_response(429, 130429, leaky),
        ]

        def transport_leak(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError(leaky, request=request)

        def read_leak(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout(leaky, request=request)

        answers += [transport_leak, read_leak]
        for answer in answers:
            result = self.send_one(answer)
            assert not isinstance(result, Accepted)
            assert TOKEN not in repr(result)
            assert TOKEN not in str(result)
            assert "bad token" in str(result)  # the rest of the provider's text is kept
        provider = self.make(self.ok_response)
        assert TOKEN not in repr(provider)
        assert TOKEN not in str(provider)

    def test_invalid_request_sends_nothing(self) -> None:
        calls: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return self.ok_response(request)

        result = self.make(handler).send(SendRequest(job_id="1", to=PHONE, sender=None, kind="text", text=""))
        assert isinstance(result, Permanent)
        assert calls == []

    def test_send_after_close_is_retryable_and_sends_nothing(self) -> None:
        calls: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return self.ok_response(request)

        provider = self.make(handler)
        provider.close()
        assert isinstance(provider.send(TEXT), Retryable)
        assert calls == []

    def test_send_is_thread_safe(self) -> None:
        lock = threading.Lock()
        counter = iter(range(10_000))

        def handler(request: httpx.Request) -> httpx.Response:
            with lock:
                n = next(counter)
            return self.ok_response(request, n)

        provider = self.make(handler)
        results: list[SendResult] = []

        def worker(k: int) -> None:
            for i in range(25):
                r = provider.send(
                    SendRequest(job_id=f"{k}-{i}", to=PHONE, sender=None, kind="text", text="x")
                )
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 200
        assert all(isinstance(r, Accepted) for r in results)
        assert len({r.message_id for r in results if isinstance(r, Accepted)}) == 200

    def test_logs_mask_the_phone_and_omit_body_and_token(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        self.send_one(self.ok_response)
        self.send_one(self.error_response(400, 131026, "nope"))
        lines = [r.getMessage() for r in caplog.records]
        assert any(MASKED in line for line in lines)
        for line in lines:
            assert "987654321" not in line
            assert "Hola Ana" not in line
            assert TOKEN not in line


# -- Meta ----------------------------------------------------------------------------


def meta_error(code: int | str, message: str = "refused", subcode: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


def meta_cases() -> list[Case]:
    cases = [
        Case("130429-sender", 429, meta_error(130429), Throttled, "130429", "sender"),
        Case("130429-as-400", 400, meta_error(130429), Throttled, "130429", "sender"),
        Case("4-app-rate", 400, meta_error(4), Throttled, "4", "sender"),
        Case("80007-waba-rate", 400, meta_error(80007), Throttled, "80007", "sender"),
        Case("131048-spam-rate", 400, meta_error(131048), Throttled, "131048", "sender"),
        Case("131056-pair", 400, meta_error(131056), Throttled, "131056", "recipient"),
        Case("429-nobody", 429, None, Throttled, None, "sender"),
        Case("401-nobody", 401, None, SenderBlocked),
        Case("403-nobody", 403, None, SenderBlocked),
        Case("404-html", 404, b"<html>no</html>", Permanent),
        Case("unknown-4xx", 400, meta_error(999999), Permanent, "999999"),
        # A 5xx proves "not accepted" only with an explicit temporary code.
        Case("unknown-5xx", 503, meta_error(999999), Ambiguous, "999999"),
        Case("gateway-json-5xx", 504, {"error": {"message": "upstream request timeout"}}, Ambiguous),
        Case("wrong-phone-number-id", 400, meta_error(100, subcode=33), SenderBlocked, "100"),
        Case("code-as-string", 400, meta_error("131026"), Permanent, "131026"),
    ]
    for code in (1, 2, 131000, 131016, 131057):
        cases.append(
            Case(f"{code}-retryable", 500 if code < 100000 else 400, meta_error(code), Retryable, str(code))
        )
    for code, status in (
        (190, 401),
        (131031, 400),
        (131042, 400),
        (368, 403),
        (10, 403),
        (200, 403),
        (131005, 403),
    ):
        cases.append(Case(f"{code}-blocked", status, meta_error(code), SenderBlocked, str(code)))
    for code in (131026, 131047, 131051, 131021, 131008, 131009, 100, 133010, 132000, 132001, 132015, 132999):
        cases.append(Case(f"{code}-permanent", 400, meta_error(code), Permanent, str(code)))
    return cases


class TestMetaProvider(ProviderContract):
    provider_class = MetaProvider
    CODE_CASES = meta_cases()
    ENV: ClassVar[dict[str, str]] = {
        "COLA_META_BASE_URL": BASE + "/",
        "COLA_META_API_VERSION": "v21.0",
        "COLA_META_PHONE_NUMBER_ID": "1098765",
        "COLA_META_TOKEN": TOKEN,
    }
    phone_number_id = "1098765"
    SENDER = "2200334455"

    def ok_response(self, request: httpx.Request, n: int | None = None) -> httpx.Response:
        body = json.loads(request.content)
        mid = f"msg-{body['biz_opaque_callback_data']}" if n is None else f"msg-{n}"
        return httpx.Response(
            200,
            json={
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                "messages": [{"id": mid}],
            },
        )

    def no_id_response(self) -> httpx.Response:
        return httpx.Response(200, json={"messaging_product": "whatsapp", "messages": []})

    ERROR_CODES: ClassVar[dict[str, int]] = {
        "retryable": 131000,
        "throttled": 130429,
        "permanent": 131026,
        "blocked": 190,
    }

    def ok_with_error_response(self, kind: str, with_id: bool) -> httpx.Response:
        body: dict[str, Any] = {"messaging_product": "whatsapp", **meta_error(self.ERROR_CODES[kind])}
        if with_id:
            body["messages"] = [{"id": "msg-4242"}]
        return httpx.Response(200, json=body, headers={"Retry-After": "5"})

    def error_response(self, status: int, code: int | str, message: str) -> httpx.Response:
        return httpx.Response(status, json=meta_error(code, message))

    def check_auth(self, request: httpx.Request) -> None:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"

    def check_text_request(self, request: httpx.Request) -> None:
        assert str(request.url) == f"{BASE}/v21.0/{self.phone_number_id}/messages"
        assert request.headers["Content-Type"] == "application/json"
        assert json.loads(request.content) == {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "51987654321",
            "type": "text",
            "text": {"body": "Hola Ana"},
            "biz_opaque_callback_data": "4242",
        }

    def check_template_request(self, request: httpx.Request) -> None:
        body = json.loads(request.content)
        assert body["biz_opaque_callback_data"] == "4243"
        assert body["type"] == "template"
        assert body["template"] == {
            "name": "recordatorio_cita",
            "language": {"code": "es"},
            "components": [
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "lunes 10:00"}],
                }
            ],
        }

    def check_sender(self, request: httpx.Request, sender: str) -> None:
        assert str(request.url) == f"{BASE}/v21.0/{sender}/messages"

    def test_template_without_params_omits_components(self) -> None:
        seen: list[dict[str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(json.loads(request.content))
            return self.ok_response(request)

        request = SendRequest(
            job_id="9", to=PHONE, sender=None, kind="template", template="hello", language="en"
        )
        assert isinstance(self.make(handler).send(request), Accepted)
        assert seen[0]["template"] == {"name": "hello", "language": {"code": "en"}}

    def test_error_subcode_and_long_text(self) -> None:
        result = self.send_one(httpx.Response(400, json=meta_error(131026, "x" * 2000, subcode=2494010)))
        assert isinstance(result, Permanent)
        assert len(result.text) <= 500
        result = self.send_one(
            httpx.Response(400, json=meta_error(100, "Invalid parameter", subcode=2494010))
        )
        assert isinstance(result, Permanent) and "subcode 2494010" in result.text


class TestFakeProvider(TestMetaProvider):
    """``fake`` is the Meta client pointed at ``COLA_FAKE_BASE_URL``."""

    provider_class = FakeProvider
    ENV: ClassVar[dict[str, str]] = {
        "COLA_FAKE_BASE_URL": BASE,
        "COLA_META_PHONE_NUMBER_ID": "1098765",
        "COLA_META_TOKEN": TOKEN,
        "COLA_META_BASE_URL": "https://must-not-be-used.test",
    }

    def test_defaults_need_no_credentials(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        provider = FakeProvider.from_settings(
            load_settings(environ={}), transport=httpx.MockTransport(handler)
        )
        self.opened.append(provider)
        assert provider.name == "fake"
        assert isinstance(provider.send(TEXT), Accepted)
        assert str(seen[0].url) == "http://127.0.0.1:8765/v21.0/sandbox/messages"
        assert seen[0].headers["Authorization"] == "Bearer sandbox"


# -- Twilio --------------------------------------------------------------------------


def twilio_error(code: int, status: int, message: str = "refused") -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def twilio_cases() -> list[Case]:
    cases = [
        Case("20429", 429, twilio_error(20429, 429), Throttled, "20429", "sender"),
        Case("63018-channel-rate", 429, twilio_error(63018, 429), Throttled, "63018", "sender"),
        Case("429-nobody", 429, None, Throttled, None, "sender"),
        Case("20503", 503, twilio_error(20503, 503), Retryable, "20503"),
        Case("20003", 401, twilio_error(20003, 401), SenderBlocked, "20003"),
        Case("401-nobody", 401, None, SenderBlocked),
        Case("403-nobody", 403, None, SenderBlocked),
        Case("other-4xx", 400, twilio_error(21610, 400), Permanent, "21610"),
        # A 404 means a wrong account SID or base URL: every row would fail, so stop.
        Case("404-html", 404, b"<html>no</html>", SenderBlocked),
        Case("20404-account-not-found", 404, twilio_error(20404, 404), SenderBlocked, "20404"),
        # A 5xx proves "not accepted" only with an explicit temporary code (20503).
        Case("5xx-with-twilio-body", 500, twilio_error(20500, 500), Ambiguous, "20500"),
        Case("gateway-json-5xx", 504, {"message": "Endpoint request timed out"}, Ambiguous),
    ]
    for code in (21211, 63016, 21614, 21408, 63024):
        cases.append(Case(f"{code}-permanent", 400, twilio_error(code, 400), Permanent, str(code)))
    return cases


class TestTwilioProvider(ProviderContract):
    provider_class = TwilioProvider
    CODE_CASES = twilio_cases()
    ENV: ClassVar[dict[str, str]] = {
        "COLA_TWILIO_BASE_URL": BASE,
        "COLA_TWILIO_ACCOUNT_SID": "AC0123",
        "COLA_TWILIO_AUTH_TOKEN": TOKEN,
        "COLA_TWILIO_FROM": "+14155238886",
    }

    def ok_response(self, request: httpx.Request, n: int | None = None) -> httpx.Response:
        return httpx.Response(201, json={"sid": "msg-4242" if n is None else f"msg-{n}", "status": "queued"})

    def no_id_response(self) -> httpx.Response:
        return httpx.Response(201, json={"status": "queued"})

    ERROR_CODES: ClassVar[dict[str, int]] = {
        "retryable": 20503,
        "throttled": 20429,
        "permanent": 21211,
        "blocked": 20003,
    }

    def ok_with_error_response(self, kind: str, with_id: bool) -> httpx.Response:
        code = self.ERROR_CODES[kind]
        body: dict[str, Any] = {**twilio_error(code, 201), "error_code": code, "error_message": "refused"}
        if with_id:
            body["sid"] = "msg-4242"
        return httpx.Response(201, json=body, headers={"Retry-After": "5"})

    def error_response(self, status: int, code: int | str, message: str) -> httpx.Response:
        twilio_code = {131026: 21211, 190: 20003, 131000: 20503, 130429: 20429}.get(int(code), int(code))
        return httpx.Response(status, json=twilio_error(twilio_code, status, message))

    def form(self, request: httpx.Request) -> dict[str, str]:
        parsed = parse_qs(request.content.decode(), strict_parsing=True)
        return {k: v[0] for k, v in parsed.items()}

    def check_auth(self, request: httpx.Request) -> None:
        expected = base64.b64encode(f"AC0123:{TOKEN}".encode()).decode()
        assert request.headers["Authorization"] == f"Basic {expected}"

    def check_text_request(self, request: httpx.Request) -> None:
        assert str(request.url) == f"{BASE}/2010-04-01/Accounts/AC0123/Messages.json"
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert self.form(request) == {
            "To": "whatsapp:+51987654321",
            "From": "whatsapp:+14155238886",
            "Body": "Hola Ana",
        }

    def check_template_request(self, request: httpx.Request) -> None:
        form = self.form(request)
        assert form["ContentSid"] == "recordatorio_cita"
        assert json.loads(form["ContentVariables"]) == {"1": "Ana", "2": "lunes 10:00"}
        assert "Body" not in form

    def check_sender(self, request: httpx.Request, sender: str) -> None:
        assert self.form(request)["From"] == f"whatsapp:{sender}"

    def test_api_key_is_the_basic_auth_username(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        self.make(handler, COLA_TWILIO_API_KEY="SK999").send(TEXT)
        expected = base64.b64encode(f"SK999:{TOKEN}".encode()).decode()
        assert seen[0].headers["Authorization"] == f"Basic {expected}"
        assert "/Accounts/AC0123/" in seen[0].url.path

    def test_status_callback_names_the_job_when_receipts_have_a_public_url(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        self.make(handler, COLA_RECEIPTS_PUBLIC_URL="https://hooks.example.com/cola/").send(TEXT)
        assert self.form(seen[0])["StatusCallback"] == "https://hooks.example.com/cola/twilio?job=4242"


# -- Webhook -------------------------------------------------------------------------


class TestWebhookProvider(ProviderContract):
    provider_class = WebhookProvider
    CODE_CASES: ClassVar[list[Case]] = [
        Case("429-sender", 429, None, Throttled, None, "sender"),
        Case("429-recipient", 429, {"scope": "recipient"}, Throttled, None, "recipient"),
        Case("429-with-code", 429, {"error": {"code": "busy"}}, Throttled, "busy", "sender"),
        Case("401", 401, None, SenderBlocked),
        Case(
            "403-with-code",
            403,
            {"error": {"code": "sender_banned", "message": "no"}},
            SenderBlocked,
            "sender_banned",
        ),
        Case(
            "400-with-code",
            400,
            {"error": {"code": "bad_number", "message": "no such"}},
            Permanent,
            "bad_number",
        ),
        Case("422-nobody", 422, None, Permanent),
        Case("404-wrong-url", 404, None, SenderBlocked),
        Case("500-retryable", 500, {"error": {"code": "busy", "retryable": True}}, Retryable, "busy"),
        Case("503-retryable-false", 503, {"error": {"code": "x", "retryable": False}}, Ambiguous, "x"),
        Case("500-json-without-error", 500, {"detail": "oops"}, Ambiguous),
    ]
    ENV: ClassVar[dict[str, str]] = {"COLA_WEBHOOK_URL": BASE + "/send", "COLA_WEBHOOK_TOKEN": TOKEN}

    def ok_response(self, request: httpx.Request, n: int | None = None) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json={"id": f"msg-{body['job_id']}" if n is None else f"msg-{n}"})

    def no_id_response(self) -> httpx.Response:
        return httpx.Response(202, json={"status": "queued"})

    ERROR_BODIES: ClassVar[dict[str, dict[str, Any]]] = {
        "retryable": {"error": {"code": "busy", "retryable": True}},
        "throttled": {"error": {"code": "rate"}, "scope": "recipient"},
        "permanent": {"error": {"code": "bad_number", "message": "no such"}},
        "blocked": {"error": {"code": "sender_banned", "message": "no"}},
    }

    def ok_with_error_response(self, kind: str, with_id: bool) -> httpx.Response:
        body = dict(self.ERROR_BODIES[kind])
        if with_id:
            body["id"] = "msg-4242"
        return httpx.Response(200, json=body, headers={"Retry-After": "5"})

    def error_response(self, status: int, code: int | str, message: str) -> httpx.Response:
        error: dict[str, Any] = {"code": str(code), "message": message}
        if status >= 500:
            error["retryable"] = True
        return httpx.Response(status, json={"error": error})

    def check_auth(self, request: httpx.Request) -> None:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"

    def check_text_request(self, request: httpx.Request) -> None:
        assert str(request.url) == f"{BASE}/send"
        assert json.loads(request.content) == {
            "job_id": "4242",
            "to": PHONE,
            "from": None,
            "type": "text",
            "text": "Hola Ana",
            "template": None,
        }

    def check_template_request(self, request: httpx.Request) -> None:
        assert json.loads(request.content) == {
            "job_id": "4243",
            "to": PHONE,
            "from": None,
            "type": "template",
            "text": None,
            "template": {"name": "recordatorio_cita", "language": "es", "params": ["Ana", "lunes 10:00"]},
        }

    def check_sender(self, request: httpx.Request, sender: str) -> None:
        assert json.loads(request.content)["from"] == sender

    def test_no_token_means_no_authorization_header(self) -> None:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return self.ok_response(request)

        provider = WebhookProvider.from_settings(
            load_settings(environ={"COLA_WEBHOOK_URL": BASE + "/send"}),
            transport=httpx.MockTransport(handler),
        )
        self.opened.append(provider)
        assert isinstance(provider.send(TEXT), Accepted)
        assert "Authorization" not in seen[0].headers
