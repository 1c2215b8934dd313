"""The receipts server on real databases and a real socket (the aiohttp app in
a thread of this process; tests/integration/test_receipts_e2e.py runs the
command as a process beside the sandbox and a run)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import sqlalchemy as sa
from aiohttp import web
from support import execute, rows, scalar, seed, wait_until

from worker import db
from worker.audit import run_audit
from worker.delivery import DeliveryRepository, incierto_waiting, parse_words
from worker.settings import load_settings
from worker.web.app import make_app
from worker.web.signing import (
    META_HEADER,
    TWILIO_HEADER,
    WEBHOOK_HEADER,
    hmac_sha256_signature,
    twilio_signature,
)

APP_SECRET = "meta-app-secret"
VERIFY_TOKEN = "verify-me"
TWILIO_TOKEN = "twilio-auth-token"
WEBHOOK_SECRET = "webhook-secret"


@contextmanager
def receipts_server(url: str, **env: str) -> Iterator[str]:
    """The app on 127.0.0.1 (a free port), in a thread with its own event loop."""
    environ = {
        "COLA_DATABASE_URL": url,
        "COLA_META_APP_SECRET": APP_SECRET,
        "COLA_META_VERIFY_TOKEN": VERIFY_TOKEN,
        "COLA_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "COLA_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "COLA_RECEIPT_SWEEP": "0.1",
        **{"COLA_" + k.upper(): v for k, v in env.items()},
    }
    settings = load_settings(environ=environ)
    engine = db.create_engine(url)
    repo = DeliveryRepository(engine, parse_words(settings.opt_out_words))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(settings, repo), access_log=None, handle_signals=False)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        engine.dispose()


def meta_body(statuses: list[dict[str, Any]], messages: list[dict[str, Any]] | None = None) -> bytes:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "1234"},
        "statuses": statuses,
    }
    if messages:
        value["messages"] = messages
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "waba", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(payload).encode()


def post_meta(base: str, body: bytes, secret: str = APP_SECRET, **headers: str) -> httpx.Response:
    h = {"Content-Type": "application/json", META_HEADER: hmac_sha256_signature(secret, body), **headers}
    return httpx.post(base + "/meta", content=body, headers=h, timeout=30)


def status(
    mid: str, word: str, job: int | None = None, to: str | None = None, **extra: Any
) -> dict[str, Any]:
    st: dict[str, Any] = {"id": mid, "status": word, "timestamp": "1764000000", **extra}
    if job is not None:
        st["biz_opaque_callback_data"] = str(job)
    if to is not None:
        st["recipient_id"] = to.lstrip("+")
    return st


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def set_row(url: str, row_id: int, estado: str, msg_id: str | None = None) -> None:
    execute(
        url,
        "UPDATE cola_envios SET estado=:e, proveedor_msg_id=:m, proveedor='meta' WHERE id=:i",
        e=estado,
        m=msg_id,
        i=row_id,
    )
    if estado == "enviado":
        execute(
            url,
            "INSERT INTO envios_whatsapp (cola_envio_id, sesion_id, cliente_id, telefono, proveedor, "
            "proveedor_msg_id, fecha_envio) SELECT id, sesion_id, cliente_id, telefono, 'meta', "
            "proveedor_msg_id, actualizado_at FROM cola_envios WHERE id=:i",
            i=row_id,
        )


def count(url: str, table: str, where: str = "1=1", **params: Any) -> int:
    return int(scalar(url, f"SELECT COUNT(*) FROM {table} WHERE {where}", **params))


def test_statuses_in_any_order_stored_once_and_incierto_settled(db_url: str) -> None:
    sent, uncertain, silent = seed(db_url, 3)
    set_row(db_url, sent, "enviado", "wamid.sent")
    set_row(db_url, uncertain, "incierto")
    set_row(db_url, silent, "incierto")
    table = rows(db_url)
    to_sent, to_uncertain = table[sent]["telefono"], table[uncertain]["telefono"]
    with receipts_server(db_url) as base:
        # Read before delivered before sent; delivered twice; one request with several.
        for word in ("read", "delivered", "delivered"):
            assert post_meta(base, meta_body([status("wamid.sent", word, sent, to_sent)])).status_code == 200
        assert (
            post_meta(
                base,
                meta_body(
                    [
                        status("wamid.sent", "sent", sent, to_sent),
                        status("wamid.X", "sent", uncertain, to_uncertain),
                    ]
                ),
            ).status_code
            == 200
        )
        # Meta retries: the same callback again settles nothing twice.
        assert (
            post_meta(base, meta_body([status("wamid.X", "sent", uncertain, to_uncertain)])).status_code
            == 200
        )
        assert metric(base, "cola_receipts_statuses_total", result="duplicate") == 2
        assert metric(base, "cola_receipts_settled_total") == 1

    assert count(db_url, "estados_entrega") == 4
    after = rows(db_url)
    row = after[sent]
    assert row["estado"] == "enviado" and row["entrega_estado"] == "read"
    assert row["entrega_enviado_at"] and row["entrega_entregado_at"] and row["entrega_leido_at"]
    settled = after[uncertain]
    assert settled["estado"] == "enviado" and settled["proveedor_msg_id"] == "wamid.X"
    assert settled["entrega_estado"] == "sent" and settled["error_codigo"] is None
    assert count(db_url, "envios_whatsapp", "cola_envio_id=:i", i=uncertain) == 1
    assert count(db_url, "intentos_envio", "cola_envio_id=:i AND origen='receipt'", i=uncertain) == 1
    assert after[silent]["estado"] == "incierto"

    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            waiting = incierto_waiting(conn, db.db_now(conn), 0)
        assert [r["id"] for r in waiting["rows"]] == [silent] and waiting["count"] == 1
        report = run_audit(engine, 24, receipt_window=0)
        assert report["ok"], report
        assert report["incierto_without_receipt"]["count"] == 1
    finally:
        engine.dispose()


def test_failed_after_enviado_is_recorded_and_counted_never_resent(db_url: str) -> None:
    [row_id] = seed(db_url, 1)
    set_row(db_url, row_id, "enviado", "wamid.f")
    to = rows(db_url)[row_id]["telefono"]
    with receipts_server(db_url) as base:
        body = meta_body(
            [
                status("wamid.f", "sent", row_id, to),
                status("wamid.f", "failed", row_id, to, errors=[{"code": 131049}]),
            ]
        )
        assert post_meta(base, body).status_code == 200
        assert metric(base, "cola_receipts_delivery_failed_total", code="131049") == 1
    row = rows(db_url)[row_id]
    assert (row["estado"], row["entrega_estado"], row["entrega_codigo"]) == ("enviado", "failed", "131049")
    assert row["entrega_fallido_at"] is not None and row["intentos"] == 0
    assert count(db_url, "cola_envios", "estado <> 'enviado'") == 0


def test_status_before_the_run_recorded_incierto_is_settled_by_the_sweep(db_url: str) -> None:
    [row_id] = seed(db_url, 1)
    set_row(db_url, row_id, "enviando")
    to = rows(db_url)[row_id]["telefono"]
    with receipts_server(db_url) as base:
        assert post_meta(base, meta_body([status("wamid.early", "delivered", row_id, to)])).status_code == 200
        assert rows(db_url)[row_id]["estado"] == "enviando"  # the run owns it: untouched
        set_row(db_url, row_id, "incierto")  # the run's ambiguous answer is recorded afterwards
        assert wait_until(lambda: rows(db_url)[row_id]["estado"] == "enviado", timeout=20)
    row = rows(db_url)[row_id]
    assert row["proveedor_msg_id"] == "wamid.early"
    assert count(db_url, "envios_whatsapp", "cola_envio_id=:i", i=row_id) == 1
    assert count(db_url, "intentos_envio", "origen='receipt'") == 1


def test_refused_and_bad_requests_write_nothing_and_are_counted(sqlite_db_url: str) -> None:
    url = sqlite_db_url
    [row_id] = seed(url, 1)
    set_row(url, row_id, "incierto")
    good = meta_body([status("wamid.r", "sent", row_id)])
    with receipts_server(url, receipts_max_body="2048") as base:
        unsigned = httpx.post(base + "/meta", content=good, headers={"Content-Type": "application/json"})
        assert unsigned.status_code == 401 and META_HEADER in unsigned.text
        assert post_meta(base, good, secret="wrong").status_code == 403
        assert post_meta(base, good, **{"Content-Type": "text/plain"}).status_code == 415
        big = meta_body([status("wamid.r", "sent", row_id, note="x" * 4000)])
        assert post_meta(base, big).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds
            yield b"{" + b" " * 3000
            yield b"}"

        chunked = httpx.post(
            base + "/meta",
            content=chunks(),
            headers={"Content-Type": "application/json", META_HEADER: "sha256=00"},
        )
        assert chunked.status_code == 413
        malformed = post_meta(base, b'{"entry": [')
        assert malformed.status_code == 400 and "malformed JSON" in malformed.text
        assert post_meta(base, b'{"object": "page"}').status_code == 400
        form = urlencode({"MessageSid": "SM1", "MessageStatus": "sent"})
        tw = httpx.post(
            base + "/twilio",
            content=form,
            headers={"Content-Type": "application/x-www-form-urlencoded", TWILIO_HEADER: "bm90LWl0"},
        )
        assert tw.status_code == 403
        wh = httpx.post(base + "/webhook", content=b"{}", headers={"Content-Type": "application/json"})
        assert wh.status_code == 401
        assert httpx.get(base + "/healthz").status_code == 200
        assert metric(base, "cola_receipts_requests_total", provider="meta", outcome="unsigned") == 1
        assert metric(base, "cola_receipts_requests_total", provider="meta", outcome="bad_signature") == 1
        assert metric(base, "cola_receipts_requests_total", provider="meta", outcome="bad_content_type") == 1
        assert metric(base, "cola_receipts_requests_total", provider="meta", outcome="too_large") == 2
        assert metric(base, "cola_receipts_requests_total", provider="meta", outcome="bad_body") == 2
        assert metric(base, "cola_receipts_requests_total", provider="twilio", outcome="bad_signature") == 1
    assert count(url, "estados_entrega") == 0
    assert rows(url)[row_id]["estado"] == "incierto"


def test_unknown_message_ids_are_acknowledged_counted_and_matched_later(sqlite_db_url: str) -> None:
    url = sqlite_db_url
    [row_id] = seed(url, 1)
    with receipts_server(url) as base:
        assert post_meta(base, meta_body([status("wamid.unknown", "delivered")])).status_code == 200
        assert metric(base, "cola_receipts_statuses_total", result="unknown") == 1
        # The run records the message id afterwards: the sweep matches the stored status.
        set_row(url, row_id, "enviado", "wamid.unknown")
        assert wait_until(lambda: rows(url)[row_id]["entrega_estado"] == "delivered", timeout=20)
    assert count(url, "estados_entrega", "cola_envio_id=:i", i=row_id) == 1


def test_a_job_id_whose_recipient_differs_is_not_matched(sqlite_db_url: str) -> None:
    url = sqlite_db_url
    [row_id] = seed(url, 1)
    set_row(url, row_id, "incierto")
    with receipts_server(url) as base:
        assert (
            post_meta(base, meta_body([status("wamid.other", "sent", row_id, "+15550009999")])).status_code
            == 200
        )
        assert metric(base, "cola_receipts_statuses_total", result="mismatched") == 1
    assert rows(url)[row_id]["estado"] == "incierto"


def test_meta_verification_handshake(sqlite_db_url: str) -> None:
    with receipts_server(sqlite_db_url) as base:
        ok = httpx.get(
            base + "/meta",
            params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"},
        )
        assert (ok.status_code, ok.text) == (200, "1158201444")
        bad = httpx.get(
            base + "/meta", params={"hub.mode": "subscribe", "hub.verify_token": "x", "hub.challenge": "1"}
        )
        assert bad.status_code == 403 and "1" not in bad.text.replace("\n", "")
    with receipts_server(sqlite_db_url, meta_verify_token="") as base:
        assert httpx.get(base + "/meta", params={"hub.mode": "subscribe"}).status_code == 404


def test_twilio_callbacks_are_checked_against_the_public_url(db_url: str) -> None:
    [row_id] = seed(db_url, 1)
    set_row(db_url, row_id, "incierto")
    public = "https://hooks.example.com/base"
    params = {
        "MessageSid": "SMabc",
        "MessageStatus": "delivered",
        "To": "whatsapp:" + rows(db_url)[row_id]["telefono"],
    }
    path = f"/twilio?job={row_id}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with receipts_server(db_url, receipts_public_url=public) as base:
        local = twilio_signature(TWILIO_TOKEN, base + path, params.items())
        refused = httpx.post(
            base + path, content=urlencode(params), headers={**headers, TWILIO_HEADER: local}
        )
        assert refused.status_code == 403  # signed for the URL the server sees, not the public one
        assert rows(db_url)[row_id]["estado"] == "incierto"
        signature = twilio_signature(TWILIO_TOKEN, public + path, params.items())
        ok = httpx.post(base + path, content=urlencode(params), headers={**headers, TWILIO_HEADER: signature})
        assert ok.status_code == 200
        inbound = {
            "MessageSid": "SMin",
            "From": "whatsapp:+51987000111",
            "To": "whatsapp:+1555",
            "Body": "Baja",
        }
        sig = twilio_signature(TWILIO_TOKEN, public + "/twilio", inbound.items())
        r = httpx.post(base + "/twilio", content=urlencode(inbound), headers={**headers, TWILIO_HEADER: sig})
        assert r.status_code == 200
    row = rows(db_url)[row_id]
    assert (row["estado"], row["proveedor_msg_id"], row["entrega_estado"]) == (
        "enviado",
        "SMabc",
        "delivered",
    )
    assert count(db_url, "solicitudes_baja", "telefono='+51987000111' AND palabra='BAJA'") == 1


def test_webhook_provider_callbacks_and_opt_outs_journaled_once(db_url: str) -> None:
    [row_id] = seed(db_url, 1)
    set_row(db_url, row_id, "enviado", "gw-1")
    payload = {
        "statuses": [{"id": "gw-1", "job_id": str(row_id), "status": "read"}],
        "messages": [
            {"id": "in-1", "from": "+51987000222", "to": "+1555", "text": "PARAR"},
            {"id": "in-2", "from": "+51987000222", "text": "hola, gracias"},
        ],
    }
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json",
        WEBHOOK_HEADER: hmac_sha256_signature(WEBHOOK_SECRET, body),
    }
    with receipts_server(db_url, opt_out_words="parar,stop") as base:
        for _ in range(2):  # a retried delivery journals the opt-out once
            assert httpx.post(base + "/webhook", content=body, headers=headers).status_code == 200
        meta_in = meta_body(
            [], [{"id": "wamid.in", "from": "51987000333", "type": "text", "text": {"body": "STOP"}}]
        )
        assert post_meta(base, meta_in).status_code == 200
        assert metric(base, "cola_receipts_inbound_total", kind="opt_out") == 3
        assert metric(base, "cola_receipts_inbound_total", kind="other") == 2
    assert rows(db_url)[row_id]["entrega_estado"] == "read"
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            got = conn.execute(
                sa.text("SELECT telefono, remitente, palabra FROM solicitudes_baja ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in got] == [("+51987000222", "+1555", "PARAR"), ("+51987000333", "1234", "STOP")]


def test_a_failed_write_answers_503_and_the_server_keeps_serving(sqlite_db_url: str) -> None:
    url = sqlite_db_url
    execute(url, "ALTER TABLE estados_entrega RENAME TO estados_entrega_away")
    with receipts_server(url) as base:
        assert post_meta(base, meta_body([status("wamid.z", "sent")])).status_code == 503
        assert httpx.get(base + "/healthz").status_code == 200
        execute(url, "ALTER TABLE estados_entrega_away RENAME TO estados_entrega")
        assert post_meta(base, meta_body([status("wamid.z", "sent")])).status_code == 200
        assert metric(base, "cola_receipts_write_errors_total") == 1
    assert count(url, "estados_entrega") == 1


@pytest.mark.parametrize("missing", ["all"])
def test_receipts_command_needs_a_secret(sqlite_db_url: str, tmp_path: Any, missing: str) -> None:
    from support import run_worker, worker_env

    env = worker_env(sqlite_db_url, tmp_path)
    result = run_worker(env, "receipts", "--port", "0", timeout=60)
    assert result.returncode == 2
    assert "COLA_META_APP_SECRET" in result.stderr and "Traceback" not in result.stderr
