"""Phones are masked in logs (docs/design.md, G7)."""

from __future__ import annotations

import pytest

from worker.masking import mask_phone


def test_keeps_first_three_and_last_four() -> None:
    assert mask_phone("+51987654321") == "+51*****4321"


def test_other_lengths_keep_the_same_ends() -> None:
    assert mask_phone("+14155550123") == "+14*****0123"
    assert mask_phone("+5491123456789") == "+54*******6789"


@pytest.mark.parametrize("short", ["1234567", "+123456", "+1", "12"])
def test_short_values_never_shown_whole(short: str) -> None:
    masked = mask_phone(short)
    assert masked == "*" * len(short)


def test_empty_and_none() -> None:
    assert mask_phone("") == ""
    assert mask_phone(None) == ""


def test_eight_characters_star_one() -> None:
    assert mask_phone("+5198765") == "+51*8765"
