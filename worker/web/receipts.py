"""The receipts router: provider status callbacks and inbound messages.

- ``GET /meta``: Meta's verification handshake (``hub.verify_token`` must equal
  ``COLA_META_VERIFY_TOKEN``);
- ``POST /meta``: Cloud API webhooks (statuses, messages), ``X-Hub-Signature-256``
  with ``COLA_META_APP_SECRET``;
- ``POST /twilio``: status callbacks and incoming messages, ``X-Twilio-Signature``
  with ``COLA_TWILIO_AUTH_TOKEN``;
- ``POST /webhook``: the generic webhook provider, ``X-Cola-Signature`` with
  ``COLA_WEBHOOK_SECRET``.

Each POST: size limit (413), content type (415), signature (401 missing, 403
wrong; nothing is written), body (400), then the statuses are written (one
group commit with whatever other requests are waiting) and only then answered
200: an acknowledged status is durable. A database failure answers 503, so
the provider retries. A route whose secret is not configured answers 404.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from worker.delivery import InboundMessage, StatusEvent
from worker.settings import Settings
from worker.web.signing import (
    META_HEADER,
    TWILIO_HEADER,
    WEBHOOK_HEADER,
    verify_hmac_sha256,
    verify_twilio,
)

logger = logging.getLogger(__name__)

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
_MAX_JOB_ID = 2**63 - 1


class BadInput(Exception):
    """The body is not what the provider sends (answered 400)."""


# --- parsing (pure functions) ------------------------------------------------------


def job_id(value: Any) -> int | None:
    """Our job id from a callback field: a positive decimal integer, else None."""
    text = str(value).strip() if value is not None else ""
    if not text.isdigit() or len(text) > 19:
        return None
    number = int(text)
    return number if 0 < number <= _MAX_JOB_ID else None


def _timestamp(value: Any) -> dt.datetime | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not 0 < seconds < 32503680000:  # before year 3000
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None)


def _text(value: Any, limit: int = 128) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text[:limit] if text else None


def _digits(value: Any) -> str | None:
    digits = "".join(ch for ch in str(value or "") if ch.isdigit())
    return digits or None


def _e164(value: Any) -> str | None:
    digits = _digits(str(value or "").removeprefix("whatsapp:"))
    return "+" + digits if digits else None


def parse_meta(payload: Any) -> tuple[list[StatusEvent], list[InboundMessage], int]:
    """Statuses and inbound text messages of a Cloud API webhook, and how many
    status entries were malformed (skipped). Other fields are ignored."""
    if not isinstance(payload, dict) or not isinstance(payload.get("entry"), list):
        raise BadInput("not a WhatsApp Business Account webhook (no 'entry' list)")
    statuses: list[StatusEvent] = []
    inbound: list[InboundMessage] = []
    malformed = 0
    for entry in payload["entry"]:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict):
                continue
            metadata = value.get("metadata")
            our_number = _text(metadata.get("phone_number_id"), 64) if isinstance(metadata, dict) else None
            raw_statuses = value.get("statuses")
            for st in raw_statuses if isinstance(raw_statuses, list) else []:
                event = _meta_status(st)
                if event is None:
                    malformed += 1
                else:
                    statuses.append(event)
            raw_messages = value.get("messages")
            for msg in raw_messages if isinstance(raw_messages, list) else []:
                message = _meta_message(msg, our_number)
                if message is not None:
                    inbound.append(message)
    return statuses, inbound, malformed


def _meta_status(st: Any) -> StatusEvent | None:
    if not isinstance(st, dict):
        return None
    message_id, status = _text(st.get("id")), _text(st.get("status"), 16)
    if message_id is None or status is None:
        return None
    code = None
    errors = st.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = _text(errors[0].get("code"), 32)
    return StatusEvent(
        provider="meta",
        message_id=message_id,
        status=status.lower(),
        job_id=job_id(st.get("biz_opaque_callback_data")),
        recipient=_digits(st.get("recipient_id")),
        code=code,
        occurred_at=_timestamp(st.get("timestamp")),
    )


def _meta_message(msg: Any, our_number: str | None) -> InboundMessage | None:
    if not isinstance(msg, dict):
        return None
    message_id, sender = _text(msg.get("id")), _e164(msg.get("from"))
    body: Any = None
    if isinstance(msg.get("text"), dict):
        body = msg["text"].get("body")
    elif isinstance(msg.get("button"), dict):  # a quick-reply button of a template
        body = msg["button"].get("text")
    if message_id is None or sender is None or not isinstance(body, str):
        return None
    return InboundMessage("meta", message_id, sender, our_number, body)


def parse_twilio(
    params: list[tuple[str, str]], query_job: str | None
) -> tuple[list[StatusEvent], list[InboundMessage]]:
    """A Twilio status callback (``MessageStatus``) or incoming message (``Body``)."""
    form = dict(params)
    message_id = _text(form.get("MessageSid") or form.get("SmsSid"))
    if message_id is None:
        raise BadInput("no MessageSid")
    if form.get("MessageStatus"):
        status = _text(form["MessageStatus"], 16) or ""
        event = StatusEvent(
            provider="twilio",
            message_id=message_id,
            status=status.lower(),
            job_id=job_id(query_job),
            recipient=_digits(form.get("To", "").removeprefix("whatsapp:")),
            code=_text(form.get("ErrorCode"), 32),
        )
        return [event], []
    sender = _e164(form.get("From"))
    if "Body" in form and sender is not None:
        return [], [InboundMessage("twilio", message_id, sender, _text(form.get("To"), 64), form["Body"])]
    raise BadInput("neither MessageStatus nor Body with From")


def parse_webhook(payload: Any) -> tuple[list[StatusEvent], list[InboundMessage], int]:
    """The webhook provider's callback (docs/providers.md):
    ``{"statuses": [...], "messages": [...]}``."""
    if not isinstance(payload, dict) or not (
        isinstance(payload.get("statuses", []), list) and isinstance(payload.get("messages", []), list)
    ):
        raise BadInput("expected an object with 'statuses' and/or 'messages' lists")
    statuses: list[StatusEvent] = []
    malformed = 0
    for st in payload.get("statuses", []):
        message_id = _text(st.get("id")) if isinstance(st, dict) else None
        status = _text(st.get("status"), 16) if isinstance(st, dict) else None
        if message_id is None or status is None:
            malformed += 1
            continue
        error = st.get("error")
        statuses.append(
            StatusEvent(
                provider="webhook",
                message_id=message_id,
                status=status.lower(),
                job_id=job_id(st.get("job_id")),
                recipient=_digits(st.get("to")),
                code=_text(error.get("code"), 32) if isinstance(error, dict) else None,
                occurred_at=_timestamp(st.get("timestamp")),
            )
        )
    inbound: list[InboundMessage] = []
    for msg in payload.get("messages", []):
        if not isinstance(msg, dict):
            continue
        message_id, sender, text = _text(msg.get("id")), _e164(msg.get("from")), msg.get("text")
        if message_id and sender and isinstance(text, str):
            inbound.append(InboundMessage("webhook", message_id, sender, _text(msg.get("to"), 64), text))
    return statuses, inbound, malformed


# --- HTTP ------------------------------------------------------------------------------


def _answer(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n")


class ReceiptsRoutes:
    """Handlers bound to the settings, the group writer and the metrics."""

    def __init__(self, settings: Settings, submit: Callable[..., Any], metrics: Any) -> None:
        self.settings = settings
        self.submit = submit  # async (statuses, inbound) -> None, raises on a failed write
        self.metrics = metrics

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/meta", self.meta_verify)
        app.router.add_post("/meta", self.meta)
        app.router.add_post("/twilio", self.twilio)
        app.router.add_post("/webhook", self.webhook)

    def _refuse(self, provider: str, reason: str, status: int, text: str) -> web.Response:
        self.metrics.requests.labels(provider, reason).inc()
        if status >= 500 or reason in ("bad_signature", "unsigned"):
            logger.warning("receipts: %s request refused: %s", provider, text, extra={"action": reason})
        return _answer(status, text)

    async def _body(self, request: web.Request, provider: str, content_type: str) -> bytes | web.Response:
        limit = self.settings.receipts_max_body
        if request.content_length is not None and request.content_length > limit:
            return self._refuse(provider, "too_large", 413, f"body over {limit} bytes")
        if request.content_type != content_type:
            return self._refuse(
                provider,
                "bad_content_type",
                415,
                f"Content-Type must be {content_type}, not {request.content_type}",
            )
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(provider, "too_large", 413, f"body over {limit} bytes")

    async def _store(
        self, provider: str, statuses: list[StatusEvent], inbound: list[InboundMessage]
    ) -> web.Response:
        try:
            await self.submit(statuses, inbound)
        except Exception as exc:
            logger.error("receipts: could not store %d status(es): %s", len(statuses), type(exc).__name__)
            return self._refuse(provider, "db_error", 503, "could not store: retry later")
        self.metrics.requests.labels(provider, "ok").inc()
        return _answer(200, "ok")

    # -- Meta ------------------------------------------------------------------

    async def meta_verify(self, request: web.Request) -> web.Response:
        token = self.settings.meta_verify_token
        if not token:
            return self._refuse("meta", "not_configured", 404, "COLA_META_VERIFY_TOKEN is not set")
        q = request.query
        given = q.get("hub.verify_token", "")
        if q.get("hub.mode") == "subscribe" and verify_token_matches(token, given):
            self.metrics.requests.labels("meta", "verified").inc()
            return web.Response(text=q.get("hub.challenge", ""))
        return self._refuse("meta", "bad_signature", 403, "verification refused")

    async def meta(self, request: web.Request) -> web.Response:
        return await self._signed_json(
            request, "meta", self.settings.meta_app_secret, "COLA_META_APP_SECRET", META_HEADER, parse_meta
        )

    async def _signed_json(
        self,
        request: web.Request,
        provider: str,
        secret: str | None,
        secret_name: str,
        header_name: str,
        parse: Callable[[Any], tuple[list[StatusEvent], list[InboundMessage], int]],
    ) -> web.Response:
        """A JSON callback signed with HMAC-SHA256 of its raw body (Meta, the webhook provider)."""
        if not secret:
            return self._refuse(provider, "not_configured", 404, f"{secret_name} is not set")
        body = await self._body(request, provider, JSON)
        if isinstance(body, web.Response):
            return body
        header = request.headers.get(header_name)
        if not header:
            return self._refuse(provider, "unsigned", 401, f"{header_name} is missing")
        if not verify_hmac_sha256(secret, body, header):
            return self._refuse(provider, "bad_signature", 403, f"{header_name} does not match")
        try:
            statuses, inbound, malformed = parse(_json(body))
        except BadInput as exc:
            return self._refuse(provider, "bad_body", 400, str(exc))
        self.metrics.malformed.labels(provider).inc(malformed)
        return await self._store(provider, statuses, inbound)

    # -- Twilio ----------------------------------------------------------------

    def _twilio_url(self, request: web.Request) -> str:
        public = self.settings.receipts_public_url
        if public:
            return public.rstrip("/") + request.path_qs
        return str(request.url)

    async def twilio(self, request: web.Request) -> web.Response:
        token = self.settings.twilio_auth_token
        if not token:
            return self._refuse("twilio", "not_configured", 404, "COLA_TWILIO_AUTH_TOKEN is not set")
        body = await self._body(request, "twilio", FORM)
        if isinstance(body, web.Response):
            return body
        header = request.headers.get(TWILIO_HEADER)
        if not header:
            return self._refuse("twilio", "unsigned", 401, f"{TWILIO_HEADER} is missing")
        try:
            params = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError):
            return self._refuse("twilio", "bad_body", 400, "the body is not a UTF-8 form")
        if not verify_twilio(token, self._twilio_url(request), params, header):
            return self._refuse("twilio", "bad_signature", 403, f"{TWILIO_HEADER} does not match")
        try:
            statuses, inbound = parse_twilio(params, request.query.get("job"))
        except BadInput as exc:
            return self._refuse("twilio", "bad_body", 400, str(exc))
        return await self._store("twilio", statuses, inbound)

    # -- the webhook provider --------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        return await self._signed_json(
            request,
            "webhook",
            self.settings.webhook_secret,
            "COLA_WEBHOOK_SECRET",
            WEBHOOK_HEADER,
            parse_webhook,
        )


def verify_token_matches(expected: str, given: str) -> bool:
    import hmac

    return hmac.compare_digest(expected.encode(), given.encode())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"malformed JSON: {exc}") from None


__all__ = ["BadInput", "ReceiptsRoutes", "job_id", "parse_meta", "parse_twilio", "parse_webhook"]
