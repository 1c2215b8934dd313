"""Personal data in logs (docs/design.md, G7): phone numbers are masked, bodies never logged.

Standard library only, so any module (the run, enqueue, the lock fast path) may use it.
"""

from __future__ import annotations

import re

_KEEP_HEAD = 3
_KEEP_TAIL = 4


def mask_phone(phone: str | None) -> str:
    """``"+51987654321" -> "+51*****4321"``: keep the first 3 and the last 4
    characters, star the rest. A value too short to hide anything that way is
    starred whole, so a masked value never shows the full number."""
    if not phone:
        return ""
    if len(phone) <= _KEEP_HEAD + _KEEP_TAIL:
        return "*" * len(phone)
    return phone[:_KEEP_HEAD] + "*" * (len(phone) - _KEEP_HEAD - _KEEP_TAIL) + phone[-_KEEP_TAIL:]


def mask_customer_id(customer_id: str | None) -> str:
    """A customer id that is a phone number (the default id) is masked like one."""
    if not customer_id:
        return ""
    digits = customer_id.lstrip("+").replace(" ", "").replace("-", "")
    if digits.isdigit() and len(digits) >= 7:
        return mask_phone(customer_id)
    return customer_id


# A run of digits that may be a phone number inside free text (provider error texts).
_PHONE_LIKE = re.compile(r"\+?\d[\d ()-]{5,}\d")


def mask_phones_in(text: str) -> str:
    """Mask what looks like a phone number in free text (a provider may echo the
    recipient in an error text): 9+ digits, or 7+ after a ``+``."""

    def mask(match: re.Match[str]) -> str:
        compact = re.sub(r"[ ()-]", "", match.group(0))
        digits = len(compact.lstrip("+"))
        if digits >= 9 or (compact.startswith("+") and digits >= 7):
            return mask_phone(compact)
        return match.group(0)

    return _PHONE_LIKE.sub(mask, text)
