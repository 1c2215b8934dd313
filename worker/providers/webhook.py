"""Generic JSON webhook provider, for self-hosted gateways.

The request and response contract is written out in docs/providers.md:

- 2xx with ``{"id": "..."}`` -> accepted, whatever else the body says (2xx without an id -> ambiguous);
- 429 -> throttled (``{"scope": "recipient"}`` selects the recipient; ``Retry-After``);
- 401 / 403 -> sender blocked;
- other 4xx -> permanent (``error.code`` / ``error.message`` when present);
- 5xx with ``{"error": {..., "retryable": true}}`` -> retryable; other 5xx -> ambiguous.
"""

from __future__ import annotations

from typing import Any

import httpx

from worker.errors import ConfigError
from worker.providers._http import (
    HttpProvider,
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


def webhook_payload(request: SendRequest) -> dict[str, Any] | Permanent:
    if request.kind == "text" and not request.text:
        return Permanent(code=None, text="text message without a body")
    if request.kind == "template" and not request.template:
        return Permanent(code=None, text="template message without a template name")
    template = None
    if request.kind == "template":
        template = {"name": request.template, "language": request.language, "params": list(request.params)}
    return {
        "job_id": request.job_id,
        "to": request.to,
        "from": request.sender,
        "type": request.kind,
        "text": request.text if request.kind == "text" else None,
        "template": template,
    }


class WebhookProvider(HttpProvider):
    name = "webhook"

    def __init__(
        self,
        *,
        url: str,
        token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        super().__init__(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
            transport=transport,
            headers=headers,
            secrets=(token,),
        )
        self._url = url

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> WebhookProvider:
        if not settings.webhook_url:
            raise ConfigError("COLA_WEBHOOK_URL is not set (the gateway's http(s) URL)")
        return cls(
            url=require_http_url("COLA_WEBHOOK_URL", settings.webhook_url),
            token=settings.webhook_token,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_connections=max_connections,
            transport=transport,
        )

    def build_request(self, request: SendRequest) -> httpx.Request | SendResult:
        payload = webhook_payload(request)
        if isinstance(payload, Permanent):
            return payload
        return self._client.build_request("POST", self._url, json=payload)

    def message_id(self, body: Any) -> object:
        return body.get("id") if isinstance(body, dict) else None

    def classify_error(self, response: httpx.Response) -> SendResult:
        status = response.status_code
        body = json_body(response)
        error = body.get("error") if isinstance(body, dict) else None
        code: str | None = None
        text = f"HTTP {status}"
        if isinstance(error, dict):
            if error.get("code") is not None:
                code = self.clean(error["code"])
            if error.get("message"):
                text = self.clean(error["message"])
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429:
            recipient = isinstance(body, dict) and body.get("scope") == "recipient"
            return Throttled("recipient" if recipient else "sender", retry_after, code, text, status)
        if status in (401, 403, 404):
            # Credentials, or a wrong URL that would fail every row: stop the run.
            return SenderBlocked(code, text, status)
        if 400 <= status < 500:
            return Permanent(code, text, status)
        if 500 <= status < 600 and isinstance(error, dict) and error.get("retryable") is True:
            return Retryable(code, text, retry_after, status)
        return Ambiguous(text=text, code=code, http_status=status)
