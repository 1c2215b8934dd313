"""Twilio Messages API provider (WhatsApp channel).

``POST {base}/2010-04-01/Accounts/{account_sid}/Messages.json``, form-encoded,
HTTP Basic auth (API key SID or account SID, with the auth token or key
secret). Templates are Content API templates: ``ContentSid`` plus
``ContentVariables`` ``{"1": p1, "2": p2, ...}``. The code table is in
docs/providers.md.
"""

from __future__ import annotations

import json
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

THROTTLED_SENDER = frozenset({20429, 63018})
RETRYABLE = frozenset({20503})
# 21211 invalid To, 63016 outside the 24-hour window, 21614 not a mobile
# number, 21408 region not enabled, 63024 invalid recipient.
PERMANENT = frozenset({21211, 63016, 21614, 21408, 63024})
SENDER_BLOCKED = frozenset({20003})
ACCOUNT_NOT_FOUND = 20404  # with HTTP 404: the account SID (in the URL) does not exist


def whatsapp_address(number: str) -> str:
    """``+51987654321`` (or ``51987654321``) -> ``whatsapp:+51987654321``."""
    if number.startswith("whatsapp:"):
        return number
    return "whatsapp:" + (number if number.startswith("+") else "+" + number)


def twilio_message_id(body: Any) -> object:
    """The Message resource's ``sid``, or None."""
    return body.get("sid") if isinstance(body, dict) else None


def classify_twilio(response: httpx.Response, clean: Callable[[object], str] = str) -> SendResult:
    """Map one Messages API response to a result (docs/design.md section 4)."""
    return classify_answer(response, twilio_message_id, lambda r: classify_twilio_error(r, clean))


def classify_twilio_error(response: httpx.Response, clean: Callable[[object], str] = str) -> SendResult:
    """Map one non-2xx Messages API response to a result."""
    status = response.status_code
    body = json_body(response)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))

    raw_code = body.get("code") if isinstance(body, dict) else None
    code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
    # A Twilio error body carries an integer code; {"message": ...} alone may come
    # from a gateway or proxy in front of Twilio, and proves nothing.
    has_twilio_body = isinstance(body, dict) and code is not None
    code_text = str(code) if code is not None else None
    if has_twilio_body:
        assert isinstance(body, dict)
        text = clean(body.get("message") or f"HTTP {status}")
    else:
        text = f"HTTP {status} without a Twilio error body"

    if code in THROTTLED_SENDER or status == 429:
        return Throttled("sender", retry_after, code_text, text, status)
    if code in RETRYABLE:
        return Retryable(code_text, text, retry_after, status)
    if (
        code in SENDER_BLOCKED
        or status == 401
        or (status == 403 and not has_twilio_body)
        or (status == 404 and code in (None, ACCOUNT_NOT_FOUND))
    ):
        # Credentials, or a configuration mistake (wrong account SID or base
        # URL) that would fail every row: stop the run instead.
        return SenderBlocked(code_text, text, status)
    if code in PERMANENT or 400 <= status < 500:
        return Permanent(code_text, text, status)
    # A 5xx is "not accepted" only with an explicit temporary code (above).
    return Ambiguous(text=text, code=code_text, http_status=status)


def form_payload(
    request: SendRequest, default_from: str, status_callback: str | None = None
) -> dict[str, str] | Permanent:
    form = {
        "To": whatsapp_address(request.to),
        "From": whatsapp_address(request.sender or default_from),
    }
    if status_callback:
        # `cola-worker receipts` matches the status to its row by this job id.
        form["StatusCallback"] = f"{status_callback}?job={quote(request.job_id, safe='')}"
    if request.kind == "text":
        if not request.text:
            return Permanent(code=None, text="text message without a body")
        form["Body"] = request.text
    else:
        if not request.template:
            return Permanent(code=None, text="template message without a ContentSid")
        form["ContentSid"] = request.template
        if request.params:
            variables = {str(i): p for i, p in enumerate(request.params, start=1)}
            form["ContentVariables"] = json.dumps(variables, ensure_ascii=False)
    return form


class TwilioProvider(HttpProvider):
    """Twilio. ``request.sender`` overrides ``COLA_TWILIO_FROM``."""

    name = "twilio"

    def __init__(
        self,
        *,
        base_url: str,
        account_sid: str,
        auth_token: str,
        from_number: str,
        api_key: str | None = None,
        status_callback: str | None = None,
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
            auth=httpx.BasicAuth(api_key or account_sid, auth_token),
            secrets=(auth_token,),
        )
        self._url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{quote(account_sid, safe='')}/Messages.json"
        self._from = from_number
        self._status_callback = status_callback

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> TwilioProvider:
        missing = []
        if not settings.twilio_account_sid:
            missing.append("COLA_TWILIO_ACCOUNT_SID is not set")
        if not settings.twilio_auth_token:
            missing.append("COLA_TWILIO_AUTH_TOKEN is not set (or COLA_TWILIO_AUTH_TOKEN_FILE)")
        if not settings.twilio_from:
            missing.append("COLA_TWILIO_FROM is not set (the WhatsApp sender number, E.164)")
        if missing:
            raise ConfigError("; ".join(missing))
        assert settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from
        return cls(
            base_url=require_http_url("COLA_TWILIO_BASE_URL", settings.twilio_base_url),
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            from_number=settings.twilio_from,
            api_key=settings.twilio_api_key,
            status_callback=(
                settings.receipts_public_url.rstrip("/") + "/twilio" if settings.receipts_public_url else None
            ),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_connections=max_connections,
            transport=transport,
        )

    def build_request(self, request: SendRequest) -> httpx.Request | SendResult:
        form = form_payload(request, self._from, self._status_callback)
        if isinstance(form, Permanent):
            return form
        return self._client.build_request("POST", self._url, data=form)

    def message_id(self, body: Any) -> object:
        return twilio_message_id(body)

    def classify_error(self, response: httpx.Response) -> SendResult:
        return classify_twilio_error(response, self.clean)
