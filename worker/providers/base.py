"""The provider interface: ``send(request) -> result``.

The run decides what to do with a row from the *result* only, never from HTTP
details. Every provider maps its own answers into exactly one of these result
classes (docs/design.md section 4):

- :class:`Accepted` -- the provider took the message (with its message id).
- :class:`Throttled` -- definitely not accepted; try later, no attempt spent.
- :class:`Retryable` -- definitely not accepted; try later, attempt spent
  (not when ``unreachable`` is set: no connection could be made at all).
- :class:`Permanent` -- will never be accepted as it is (code and text).
- :class:`Ambiguous` -- the request may or may not have been accepted.
- :class:`SenderBlocked` -- credentials refused or sender blocked; stop the run.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One message to send. ``job_id`` is ``str(cola_envios.id)``."""

    job_id: str
    to: str  # E.164, with the leading '+'
    sender: str | None  # phone number id / sender address; None = provider default
    kind: Literal["text", "template"]
    text: str | None = None
    template: str | None = None
    language: str | None = None
    params: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Accepted:
    message_id: str
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Throttled:
    scope: Literal["sender", "recipient"]
    retry_after: float | None = None
    code: str | None = None
    text: str | None = None
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Retryable:
    code: str | None = None
    text: str | None = None
    retry_after: float | None = None
    http_status: int | None = None
    # The provider's host (``host:port``) when no connection could be made
    # (refused, connect timeout): nothing was sent, no attempt is spent, and a
    # few in a row stop the run (exit 6).
    unreachable: str | None = None


@dataclass(frozen=True, slots=True)
class Permanent:
    code: str | None
    text: str
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Ambiguous:
    text: str
    code: str | None = None
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class SenderBlocked:
    code: str | None
    text: str
    http_status: int | None = None


SendResult = Accepted | Throttled | Retryable | Permanent | Ambiguous | SenderBlocked


class Provider(abc.ABC):
    """A way to send one WhatsApp message. Implementations must be thread-safe:
    the run calls :meth:`send` from several threads at once."""

    name: str = "provider"

    @abc.abstractmethod
    def send(self, request: SendRequest) -> SendResult:
        """Send one message and classify the answer. Never raises for provider
        or transport errors: those are results."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
