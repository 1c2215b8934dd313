"""Plumbing shared by the HTTP providers (meta, twilio, webhook): one pooled
``httpx.Client`` per provider, the transport-error mapping, ``Retry-After``
parsing, and the rules that keep secrets and phone numbers out of results
and logs.

Transport errors are classified by *when* they can happen (docs/design.md section 4):

- ``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``, ``UnsupportedProtocol``:
  raised before any byte of the request left, so the message was definitely
  not accepted -> :class:`Retryable`. ``ConnectError`` and ``ConnectTimeout``
  also name the host in ``Retryable.unreachable``: the run spends no attempt
  on them and stops after a few in a row (exit 6).
- everything else (``ReadTimeout``, ``WriteTimeout``, ``ReadError``,
  ``WriteError``, ``RemoteProtocolError``, any unexpected exception while the
  request was in flight): the provider may have accepted it -> :class:`Ambiguous`.
"""

from __future__ import annotations

import abc
import email.utils
import logging
import math
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from worker import faults
from worker.errors import ConfigError
from worker.masking import mask_phone
from worker.providers.base import (
    Accepted,
    Ambiguous,
    Provider,
    Retryable,
    SendRequest,
    SendResult,
)

MAX_TEXT = 500
REDACTED = "***"
# Shorter "secrets" (test or sandbox tokens) would mangle every word that
# happens to contain them; real tokens are far longer.
MIN_SECRET_LENGTH = 6

# Raised before the request can have reached the server: safe to send again.
NOT_SENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
# No connection could be made at all: the provider (or the way to it) is down.
UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)


def clean_text(text: object, secrets: Iterable[str] = ()) -> str:
    """Provider text as it goes into a result: secrets replaced, at most ~500 chars."""
    out = str(text)
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            out = out.replace(secret, REDACTED)
    if len(out) > MAX_TEXT:
        out = out[: MAX_TEXT - 3] + "..."
    return out


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON body, or None when there is none or it is not JSON."""
    if not response.content:
        return None
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def transport_error_result(exc: BaseException, secrets: Iterable[str] = ()) -> Retryable | Ambiguous:
    """Classify an exception raised while sending (see the module docstring)."""
    detail = clean_text(f"{type(exc).__name__}: {exc}", secrets)
    if isinstance(exc, UNREACHABLE_ERRORS):
        return Retryable(code=None, text=detail, unreachable=_request_host(exc))
    if isinstance(exc, NOT_SENT_ERRORS):
        return Retryable(code=None, text=detail)
    return Ambiguous(text=detail)


def _request_host(exc: BaseException) -> str:
    """``host:port`` of the request that failed (never its path or query)."""
    try:
        url = exc.request.url  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when unset
        return "the provider"
    return f"{url.host}:{url.port}" if url.port else str(url.host)


def require_http_url(variable: str, url: str | None) -> str:
    """A configured base URL must be absolute http(s); the message names the variable."""
    if not url:
        raise ConfigError(f"{variable} is not set")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{variable} must be an http:// or https:// URL")
    return url.rstrip("/")


def make_client(
    *,
    connect_timeout: float,
    read_timeout: float,
    max_connections: int,
    transport: httpx.BaseTransport | None,
    headers: dict[str, str] | None = None,
    auth: httpx.Auth | None = None,
) -> httpx.Client:
    """One pooled client. The pool timeout covers waiting for a connection
    held by a request that may itself take connect + read time."""
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    timeout = httpx.Timeout(
        connect=connect_timeout,
        read=read_timeout,
        write=read_timeout,
        pool=connect_timeout + read_timeout,
    )
    if transport is None:
        # Limits only apply to the transport we build; an injected one keeps its own.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        transport = httpx.HTTPTransport(limits=limits)
    return httpx.Client(
        transport=transport,
        timeout=timeout,
        headers=headers,
        auth=auth,
        follow_redirects=False,
        trust_env=False,
    )


class HttpProvider(Provider):
    """A provider that sends one HTTP request per message. Subclasses build
    the request and classify the response; this class owns the client, the
    transport-error mapping and the redaction of secrets."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        transport: httpx.BaseTransport | None,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | None = None,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self._secrets: tuple[str, ...] = tuple(s for s in secrets if s)
        self._logger = logging.getLogger(type(self).__module__)
        self._client = make_client(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
            transport=transport,
            headers=headers,
            auth=auth,
        )

    @abc.abstractmethod
    def build_request(self, request: SendRequest) -> httpx.Request | SendResult:
        """The HTTP request for one message, or a result when the message
        cannot be sent as it is (nothing goes out then)."""

    @abc.abstractmethod
    def message_id(self, body: Any) -> object:
        """The provider's message id in a decoded 2xx body (None when absent)."""

    @abc.abstractmethod
    def classify_error(self, response: httpx.Response) -> SendResult:
        """Map a complete non-2xx HTTP response to exactly one result."""

    def classify(self, response: httpx.Response) -> SendResult:
        """Map a complete HTTP response to exactly one result (see :func:`classify_answer`)."""
        return classify_answer(response, self.message_id, self.classify_error)

    def clean(self, text: object) -> str:
        return clean_text(text, self._secrets)

    def send(self, request: SendRequest) -> SendResult:
        prepared = self.build_request(request)
        if isinstance(prepared, httpx.Request) and self._client.is_closed:
            prepared = Retryable(code=None, text=f"provider {self.name} is closed; nothing was sent")
        if isinstance(prepared, httpx.Request):
            faults.watch_request(prepared.extensions, request.job_id)  # test-only crash point
            try:
                response = self._client.send(prepared)
            except Exception as exc:  # every failure in flight is a result, never a crash
                result: SendResult = transport_error_result(exc, self._secrets)
            else:
                result = self.classify(response)
        else:
            result = prepared
        self._logger.debug(
            "provider %s: job %s to %s -> %s",
            self.name,
            request.job_id,
            mask_phone(request.to),
            _outcome_name(result),
            extra={"action": "provider_send", "job": request.job_id, "outcome": _outcome_name(result)},
        )
        return result

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:  # never the token: only the class and provider name
        return f"<{type(self).__name__} name={self.name!r}>"


def classify_answer(
    response: httpx.Response,
    message_id: Callable[[Any], object],
    classify_error: Callable[[httpx.Response], SendResult],
) -> SendResult:
    """The rule every HTTP provider shares (docs/design.md section 4):
    a 2xx that carries the provider's message id is accepted, whatever else the
    body says (an ``error`` object next to the id must not make it retryable,
    or it would be sent twice); a 2xx without one is ambiguous, never
    retryable. Only other statuses reach the provider's own error table."""
    status = response.status_code
    if 200 <= status < 300:
        return accepted_or_ambiguous(message_id(json_body(response)), status)
    return classify_error(response)


def accepted_or_ambiguous(message_id: object, status: int) -> Accepted | Ambiguous:
    """A 2xx answer is only an acceptance when it carries the provider's id."""
    if isinstance(message_id, str | int) and not isinstance(message_id, bool) and str(message_id):
        return Accepted(message_id=str(message_id), http_status=status)
    return Ambiguous(text=f"HTTP {status} without a message id", http_status=status)


def _outcome_name(result: SendResult) -> str:
    return type(result).__name__.lower()
