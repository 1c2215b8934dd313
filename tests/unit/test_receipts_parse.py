"""Receipts without a database: signatures, callback parsing, opt-out words,
the sandbox's receipt options."""

from __future__ import annotations

import datetime as dt

import pytest

from worker.delivery import opt_out_word, parse_words
from worker.errors import ConfigError
from worker.sandbox import SandboxOptions
from worker.web.receipts import BadInput, job_id, parse_meta, parse_twilio, parse_webhook
from worker.web.signing import (
    hmac_sha256_signature,
    twilio_signature,
    verify_hmac_sha256,
    verify_twilio,
)

# Twilio's documented example (auth token 12345).
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
TWILIO_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_twilio_signature_matches_twilios_documented_example() -> None:
    assert twilio_signature("12345", TWILIO_URL, TWILIO_PARAMS.items()) == TWILIO_SIGNATURE
    # Order of the parameters as posted does not matter: they are sorted.
    assert verify_twilio("12345", TWILIO_URL, reversed(list(TWILIO_PARAMS.items())), TWILIO_SIGNATURE)


@pytest.mark.parametrize(
    ("token", "url", "change"),
    [
        ("54321", TWILIO_URL, {}),
        ("12345", TWILIO_URL + "&x=1", {}),
        ("12345", "http://127.0.0.1:8766/myapp.php?foo=1&bar=2", {}),  # the URL behind a proxy
        ("12345", TWILIO_URL, {"Digits": "9999"}),
    ],
)
def test_twilio_signature_refuses_any_change(token: str, url: str, change: dict[str, str]) -> None:
    params = {**TWILIO_PARAMS, **change}
    assert not verify_twilio(token, url, params.items(), TWILIO_SIGNATURE)
    assert not verify_twilio("12345", TWILIO_URL, TWILIO_PARAMS.items(), None)


def test_meta_signature_is_hmac_sha256_of_the_raw_body() -> None:
    import hashlib
    import hmac

    body = b'{"entry": []}'
    expected = "sha256=" + hmac.new(b"app-secret", body, hashlib.sha256).hexdigest()
    assert hmac_sha256_signature("app-secret", body) == expected
    assert verify_hmac_sha256("app-secret", body, expected)
    assert not verify_hmac_sha256("app-secret", body + b" ", expected)
    assert not verify_hmac_sha256("other", body, expected)
    assert not verify_hmac_sha256("app-secret", body, "")
    assert not verify_hmac_sha256("app-secret", body, expected.upper())


def _meta(statuses: list[object], messages: list[object] | None = None) -> dict[str, object]:
    value: dict[str, object] = {"metadata": {"phone_number_id": "1234"}, "statuses": statuses}
    if messages is not None:
        value["messages"] = messages
    return {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": value}]}],
    }


def test_parse_meta_statuses_codes_job_ids_and_inbound_text() -> None:
    payload = _meta(
        [
            {
                "id": "wamid.A",
                "status": "DELIVERED",
                "timestamp": "1764000000",
                "recipient_id": "51987654321",
                "biz_opaque_callback_data": "42",
            },
            {"id": "wamid.B", "status": "failed", "errors": [{"code": 131026, "title": "x"}]},
            {"status": "sent"},  # no id: malformed
            "junk",
        ],
        [
            {"id": "wamid.in1", "from": "51987654321", "type": "text", "text": {"body": " Baja. "}},
            {"id": "wamid.in2", "from": "51987654321", "type": "image", "image": {}},
        ],
    )
    statuses, inbound, malformed = parse_meta(payload)
    assert malformed == 2
    a, b = statuses
    assert (a.message_id, a.status, a.job_id, a.recipient) == ("wamid.A", "delivered", 42, "51987654321")
    assert a.occurred_at == dt.datetime(2025, 11, 24, 16, 0)
    assert (b.status, b.code, b.job_id) == ("failed", "131026", None)
    [msg] = inbound
    assert (msg.sender, msg.to, msg.text) == ("+51987654321", "1234", " Baja. ")


@pytest.mark.parametrize("payload", [[], {"object": "x"}, {"entry": "no"}, None, 3])
def test_parse_meta_refuses_what_is_not_a_webhook(payload: object) -> None:
    with pytest.raises(BadInput):
        parse_meta(payload)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("42", 42),
        (" 7 ", 7),
        ("0", None),
        ("-1", None),
        ("4x", None),
        ("", None),
        (None, None),
        ("9" * 20, None),
    ],
)
def test_job_id_is_a_positive_integer_or_nothing(raw: object, expected: int | None) -> None:
    assert job_id(raw) == expected


def test_parse_twilio_status_and_inbound() -> None:
    [status], inbound = parse_twilio(
        [
            ("MessageSid", "SM1"),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "63016"),
            ("To", "whatsapp:+519"),
        ],
        "17",
    )
    assert inbound == []
    assert (status.message_id, status.status, status.code, status.job_id, status.recipient) == (
        "SM1",
        "undelivered",
        "63016",
        17,
        "519",
    )
    statuses, [msg] = parse_twilio(
        [("MessageSid", "SM2"), ("From", "whatsapp:+51987"), ("Body", "STOP")], None
    )
    assert statuses == [] and (msg.sender, msg.text) == ("+51987", "STOP")
    with pytest.raises(BadInput):
        parse_twilio([("Foo", "bar")], None)


def test_parse_webhook_callbacks() -> None:
    statuses, inbound, malformed = parse_webhook(
        {
            "statuses": [
                {"id": "g1", "job_id": "5", "status": "read", "to": "+51 987", "timestamp": 1764000000},
                {"id": "g2", "status": "failed", "error": {"code": "E1"}},
                {"status": "read"},
            ],
            "messages": [{"id": "in1", "from": "+51987", "text": "alto"}],
        }
    )
    assert malformed == 1
    assert [(s.message_id, s.status, s.job_id, s.code) for s in statuses] == [
        ("g1", "read", 5, None),
        ("g2", "failed", None, "E1"),
    ]
    assert inbound[0].text == "alto"
    for bad in ([], {"statuses": "x"}, {"messages": 3}):
        with pytest.raises(BadInput):
            parse_webhook(bad)


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("STOP", "STOP"),
        (" baja ", "BAJA"),
        ("Alto!", "ALTO"),
        ("¡BAJA!", "BAJA"),
        ("stop please", None),
        ("", None),
    ],
)
def test_opt_out_words(text: str, word: str | None) -> None:
    assert opt_out_word(text, parse_words("STOP, BAJA,ALTO")) == word


def test_sandbox_receipt_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="--receipts-secret"):
        SandboxOptions(receipts_url="http://127.0.0.1:1/meta")
    with pytest.raises(ConfigError, match="--receipts-url"):
        SandboxOptions(receipts_url="ftp://x/meta", receipts_secret="s")
    with pytest.raises(ConfigError, match="--receipts-failed"):
        SandboxOptions(receipts_failed=1.5)
    assert SandboxOptions(reset_before=0.5).rates()[4] == ("reset-before", 0.5)
