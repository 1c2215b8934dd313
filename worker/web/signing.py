"""Signatures of the providers' callbacks (standard library only: the sandbox
signs its status webhooks with these functions, the receiver checks them).

- Meta: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body, key = app secret>``.
- Twilio: ``X-Twilio-Signature: base64(HMAC-SHA1(auth token, URL + the POST
  parameters sorted by name, each name followed by its value))``, where URL is
  the full URL Twilio called, query string included.
- webhook provider (ours): ``X-Cola-Signature: sha256=<hex HMAC-SHA256 of the
  raw body, key = COLA_WEBHOOK_SECRET>`` (docs/providers.md).

Every comparison is constant-time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

META_HEADER = "X-Hub-Signature-256"
TWILIO_HEADER = "X-Twilio-Signature"
WEBHOOK_HEADER = "X-Cola-Signature"


def hmac_sha256_signature(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: Meta's scheme, also used for the webhook provider."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_hmac_sha256(secret: str, body: bytes, header: str | None) -> bool:
    if not header:
        return False
    return hmac.compare_digest(hmac_sha256_signature(secret, body).encode(), header.strip().encode())


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's request signature (their documented algorithm)."""
    data = url + "".join(name + value for name, value in sorted(params, key=lambda kv: (kv[0], kv[1])))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify_twilio(auth_token: str, url: str, params: Iterable[tuple[str, str]], header: str | None) -> bool:
    if not header:
        return False
    expected = twilio_signature(auth_token, url, list(params))
    return hmac.compare_digest(expected.encode(), header.strip().encode())


__all__ = [
    "META_HEADER",
    "TWILIO_HEADER",
    "WEBHOOK_HEADER",
    "hmac_sha256_signature",
    "twilio_signature",
    "verify_hmac_sha256",
    "verify_twilio",
]
