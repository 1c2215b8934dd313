"""WhatsApp Cloud API (Meta) provider, and ``fake``: the same client pointed
at the local sandbox (``cola-worker fake-provider``).

``POST {base}/{version}/{phone_number_id}/messages`` with a bearer token. The
job id travels in ``biz_opaque_callback_data`` so every delivery webhook can be
traced back to its row. The code table is in docs/providers.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from worker.errors import ConfigError
from worker.providers._http import (
    HttpProvider,
    classify_answer,
    json_body,
    parse_retry_after,
    require_http_url,
)
from worker.providers.base import (
    Ambiguous,
    Permanent,
    Retryable,
    SenderBlocked,
    SendRequest,
    SendResult,
    Throttled,
)
from worker.settings import Settings

THROTTLED_SENDER = frozenset({4, 80007, 130429, 131048})
THROTTLED_RECIPIENT = frozenset({131056})
RETRYABLE = frozenset({1, 2, 131000, 131016, 131057})
# 190 token expired/invalid, 10 and 200-299 permission, 368 policy block,
# 131005 access denied, 131031 account locked, 131042 payment problem.
SENDER_BLOCKED = frozenset({190, 10, 368, 131005, 131031, 131042, *range(200, 300)})
PERMANENT = frozenset({100, 131008, 131009, 131021, 131026, 131047, 131051, 133010, *range(132000, 133000)})

# Code 100 with this subcode: "Object with ID ... does not exist" (the phone number id).
WRONG_PHONE_NUMBER_ID_SUBCODE = 33

SANDBOX_PHONE_NUMBER_ID = "sandbox"
SANDBOX_TOKEN = "sandbox"


def meta_message_id(body: Any) -> object:
    """``messages[0].id`` of a Cloud API success body, or None."""
    messages = body.get("messages") if isinstance(body, dict) else None
    first = messages[0] if isinstance(messages, list) and messages else None
    return first.get("id") if isinstance(first, dict) else None


def classify_meta(response: httpx.Response, clean: Callable[[object], str] = str) -> SendResult:
    """Map one Cloud API response to a result (docs/design.md section 4)."""
    return classify_answer(response, meta_message_id, lambda r: classify_meta_error(r, clean))


def classify_meta_error(response: httpx.Response, clean: Callable[[object], str] = str) -> SendResult:
    """Map one non-2xx Cloud API response to a result."""
    status = response.status_code
    body = json_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    retry_after = parse_retry_after(response.headers.get("Retry-After"))

    # A Meta error body carries an integer code; a JSON "error" without one may
    # come from a proxy or gateway in front of Meta, and proves nothing.
    if isinstance(error, dict) and _meta_code(error.get("code")) is not None:
        return _classify_error(error, status, retry_after, clean)
    # No Meta error body: the answer may come from a proxy or load balancer.
    if status == 429:
        return Throttled(scope="sender", retry_after=retry_after, text="HTTP 429", http_status=status)
    if status in (401, 403):
        return SenderBlocked(code=None, text=f"HTTP {status} without a Meta error body", http_status=status)
    if 400 <= status < 500:
        return Permanent(code=None, text=f"HTTP {status} without a Meta error body", http_status=status)
    return Ambiguous(text=f"HTTP {status} without a Meta error body", http_status=status)


def _classify_error(
    error: dict[str, Any], status: int, retry_after: float | None, clean: Callable[[object], str]
) -> SendResult:
    code = _meta_code(error.get("code"))
    code_text = str(code) if code is not None else None
    message = str(error.get("message") or error.get("error_user_msg") or f"HTTP {status}")
    subcode = error.get("error_subcode")
    if subcode is not None:
        message = f"{message} (subcode {subcode})"
    text = clean(message)

    if code in THROTTLED_RECIPIENT:
        return Throttled("recipient", retry_after, code_text, text, status)
    if code in THROTTLED_SENDER:
        return Throttled("sender", retry_after, code_text, text, status)
    if code in RETRYABLE:
        return Retryable(code_text, text, retry_after, status)
    if code in SENDER_BLOCKED or (code == 100 and subcode == WRONG_PHONE_NUMBER_ID_SUBCODE):
        # A configuration mistake (e.g. a wrong phone number id) would fail every row: stop instead.
        return SenderBlocked(code_text, text, status)
    if code in PERMANENT:
        return Permanent(code_text, text, status)
    if status == 429:
        return Throttled("sender", retry_after, code_text, text, status)
    if 500 <= status < 600:
        # Only the explicit temporary codes above prove "not accepted" on a 5xx.
        return Ambiguous(text, code_text, status)
    if status in (401, 403) and code is None:
        return SenderBlocked(code_text, text, status)
    return Permanent(code_text, text, status)


def _meta_code(raw: object) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)
    return None


def message_payload(request: SendRequest) -> dict[str, Any] | Permanent:
    """The Cloud API JSON body, or Permanent when the request cannot be sent."""
    payload: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": request.to.lstrip("+"),  # Meta wants E.164 digits without '+'
        "biz_opaque_callback_data": request.job_id,
    }
    if request.kind == "text":
        if not request.text:
            return Permanent(code=None, text="text message without a body")
        payload["type"] = "text"
        payload["text"] = {"body": request.text}
    else:
        if not request.template or not request.language:
            return Permanent(code=None, text="template message without a template name or language")
        template: dict[str, Any] = {"name": request.template, "language": {"code": request.language}}
        if request.params:
            template["components"] = [
                {"type": "body", "parameters": [{"type": "text", "text": p} for p in request.params]}
            ]
        payload["type"] = "template"
        payload["template"] = template
    return payload


class MetaProvider(HttpProvider):
    """WhatsApp Cloud API. ``request.sender`` overrides the phone number id."""

    name = "meta"

    def __init__(
        self,
        *,
        base_url: str,
        api_version: str,
        phone_number_id: str,
        token: str,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
            transport=transport,
            headers={"Authorization": f"Bearer {token}"},
            secrets=self._secrets_for(token),
        )
        self._base_url = base_url.rstrip("/")
        self._api_version = api_version.strip("/")
        self._phone_number_id = phone_number_id

    @staticmethod
    def _secrets_for(token: str) -> tuple[str, ...]:
        return (token,)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> MetaProvider:
        missing = []
        if not settings.meta_token:
            missing.append("COLA_META_TOKEN is not set (or COLA_META_TOKEN_FILE)")
        if not settings.meta_phone_number_id:
            missing.append("COLA_META_PHONE_NUMBER_ID is not set (the default sender's phone number id)")
        if missing:
            raise ConfigError("; ".join(missing))
        assert settings.meta_token is not None and settings.meta_phone_number_id is not None
        return cls(
            base_url=require_http_url("COLA_META_BASE_URL", settings.meta_base_url),
            api_version=settings.meta_api_version,
            phone_number_id=settings.meta_phone_number_id,
            token=settings.meta_token,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_connections=max_connections,
            transport=transport,
        )

    def url_for(self, sender: str | None) -> str:
        phone_number_id = quote(sender or self._phone_number_id, safe="")
        return f"{self._base_url}/{self._api_version}/{phone_number_id}/messages"

    def build_request(self, request: SendRequest) -> httpx.Request | SendResult:
        payload = message_payload(request)
        if isinstance(payload, Permanent):
            return payload
        return self._client.build_request("POST", self.url_for(request.sender), json=payload)

    def message_id(self, body: Any) -> object:
        return meta_message_id(body)

    def classify_error(self, response: httpx.Response) -> SendResult:
        return classify_meta_error(response, self.clean)


class FakeProvider(MetaProvider):
    """The Meta client pointed at the local sandbox (``cola-worker fake-provider``)."""

    name = "fake"

    @staticmethod
    def _secrets_for(token: str) -> tuple[str, ...]:
        return () if token == SANDBOX_TOKEN else (token,)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> MetaProvider:
        return cls(
            base_url=require_http_url("COLA_FAKE_BASE_URL", settings.fake_base_url),
            api_version=settings.meta_api_version,
            phone_number_id=settings.meta_phone_number_id or SANDBOX_PHONE_NUMBER_ID,
            token=settings.meta_token or SANDBOX_TOKEN,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_connections=max_connections,
            transport=transport,
        )
