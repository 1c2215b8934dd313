"""Providers: how a message leaves. See :mod:`worker.providers.base`."""

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

__all__ = [
    "Accepted",
    "Ambiguous",
    "Permanent",
    "Provider",
    "Retryable",
    "SendRequest",
    "SendResult",
    "SenderBlocked",
    "Throttled",
]
