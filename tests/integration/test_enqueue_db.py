"""Enqueue against real databases (SQLite, MariaDB, PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pytest
import sqlalchemy as sa

from worker import db
from worker import importer as enq
from worker.errors import InputError
from worker.importer import InvalidRow, InvalidRowsError, import_rows, read_csv, read_jsonl
from worker.schema import CANCELADA, PAUSADA, cola_envios, sesiones_envio
from worker.settings import Settings, load_settings


@pytest.fixture
def settings(db_url: str) -> Settings:
    return load_settings(environ={"COLA_DATABASE_URL": db_url, "COLA_MAX_ATTEMPTS": "7"})


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def csv_rows(text: str) -> tuple[list[enq.RawRow], list[InvalidRow]]:
    return read_csv(io.StringIO(text, newline=""))


GOOD_CSV = (
    "cliente_id,cliente_nombre,telefono,mensaje,plantilla,idioma,parametros,enviar_desde,enviar_hasta\n"
    'c1,Ana,+51987654321,"Hola Ana,\nsu cita es mañana",,,,,\n'
    "c2,Bob,+51987654322,,recordatorio,es_PE,Bob|lunes,2030-01-02T09:00:00-05:00,2030-01-03T00:00:00Z\n"
    ",,+51987654323,solo texto,,,,,\n"
)


def test_insert_then_same_file_again_inserts_nothing(engine: sa.Engine, settings: Settings) -> None:
    rows, errs = csv_rows(GOOD_CSV)
    assert errs == []
    first = import_rows("campaña-1", rows, engine=engine, settings=settings)
    assert (first.inserted, first.already_queued, first.invalid) == (3, 0, [])
    second = import_rows("campaña-1", rows, engine=engine, settings=settings)
    assert (second.inserted, second.already_queued, second.invalid) == (0, 3, [])
    assert count(engine, cola_envios) == 3
    assert count(engine, sesiones_envio) == 1


def test_rows_are_written_as_the_contract_says(engine: sa.Engine, settings: Settings) -> None:
    with engine.connect() as conn:
        before = db.db_now(conn)
    rows, _ = csv_rows(GOOD_CSV)
    import_rows("campaña-1", rows, engine=engine, settings=settings)
    with engine.connect() as conn:
        after = db.db_now(conn)
        session = conn.execute(sa.select(sesiones_envio)).one()
        got = conn.execute(sa.select(cola_envios).order_by(cola_envios.c.id)).all()
    assert session.nombre == "campaña-1" and session.estado == "activa"
    assert [r.sesion_id for r in got] == [session.id] * 3
    text, template, bare = got
    assert (text.cliente_id, text.cliente_nombre, text.telefono, text.tipo) == (
        "c1",
        "Ana",
        "+51987654321",
        "text",
    )
    assert json.loads(text.payload) == {"text": "Hola Ana,\nsu cita es mañana"}
    assert template.tipo == "template"
    assert json.loads(template.payload) == {
        "template": "recordatorio",
        "language": "es_PE",
        "params": ["Bob", "lunes"],
    }
    assert template.proximo_intento_at == dt.datetime(2030, 1, 2, 14, 0)  # naive UTC
    assert template.enviar_hasta == dt.datetime(2030, 1, 3, 0, 0)
    assert bare.cliente_id == "+51987654323" and bare.cliente_nombre is None
    for r in got:
        assert r.estado == "pendiente" and r.intentos == 0 and r.max_intentos == 7
        assert before <= r.creado_at <= after and r.actualizado_at == r.creado_at
        assert r.claim_token is None and r.ejecucion_id is None
    assert before <= text.proximo_intento_at <= after  # no enviar_desde: the database's clock
    assert len({r.clave for r in got}) == 3


def test_bad_file_inserts_nothing_not_even_the_session(engine: sa.Engine, settings: Settings) -> None:
    text = GOOD_CSV + ",,12345,hola,,,,,\n" + ",,+51987654324,,,,,,\n"  # lines 6 and 7
    rows, errs = csv_rows(text)
    with pytest.raises(InvalidRowsError) as caught:
        import_rows("s", rows, engine=engine, settings=settings, read_errors=errs)
    message = str(caught.value)
    assert "line 6: telefono:" in message and "COLA_DEFAULT_REGION" in message
    assert "line 7: mensaje: one of mensaje or plantilla is required" in message
    assert [e.line for e in caught.value.invalid] == [6, 7]
    assert count(engine, cola_envios) == 0
    assert count(engine, sesiones_envio) == 0


def test_skip_invalid_inserts_the_valid_rows(engine: sa.Engine, settings: Settings) -> None:
    lines = [
        json.dumps({"telefono": "+51987654321", "mensaje": "uno"}),
        "{broken",
        json.dumps({"telefono": "+51987654322", "mensaje": "x" * 5000}),
        "",
        json.dumps({"telefono": "+51987654323", "plantilla": "cita", "idioma": "es", "parametros": ["a"]}),
    ]
    rows, errs = read_jsonl(io.StringIO("\n".join(lines)))
    result = import_rows("s", rows, engine=engine, settings=settings, read_errors=errs, skip_invalid=True)
    assert result.inserted == 2 and result.already_queued == 0
    assert [(e.line, e.field) for e in result.invalid] == [(2, "(row)"), (3, "mensaje")]
    assert count(engine, cola_envios) == 2


def test_repeats_within_one_input_count_as_already_queued(engine: sa.Engine, settings: Settings) -> None:
    msgs = [
        {"telefono": "+51987654321", "mensaje": "a"},
        {"telefono": "+51 987 654 321", "mensaje": "a"},  # same after normalisation
        {"telefono": "+51987654322", "mensaje": "b", "clave": "k-1"},
        {"telefono": "+51987654322", "mensaje": "b", "clave": "k-1"},  # the same message, same key
    ]
    result = enq.enqueue("s", msgs, engine=engine, settings=settings)
    assert (result.inserted, result.already_queued) == (2, 2)
    assert count(engine, cola_envios) == 2


def test_derived_key_includes_the_session(engine: sa.Engine, settings: Settings) -> None:
    msg = [{"telefono": "+51987654321", "mensaje": "a"}]
    assert enq.enqueue("one", msg, engine=engine, settings=settings).inserted == 1
    assert enq.enqueue("two", msg, engine=engine, settings=settings).inserted == 1
    # A key given by the caller is global: the same key in another session is already queued.
    keyed = [{"telefono": "+51987654321", "mensaje": "a", "clave": "cita-9"}]
    assert enq.enqueue("one", keyed, engine=engine, settings=settings).inserted == 1
    again = enq.enqueue("two", keyed, engine=engine, settings=settings)
    assert (again.inserted, again.already_queued) == (0, 1)


def test_python_api_with_a_database_url(db_url: str) -> None:
    settings = load_settings(environ={})
    result = enq.enqueue(
        "api", [{"telefono": "+51987654321", "mensaje": "a"}], database_url=db_url, settings=settings
    )
    assert result.inserted == 1
    with pytest.raises(InvalidRowsError, match=r"line 2: telefono: required"):
        enq.enqueue(
            "api",
            [{"telefono": "+51987654321", "mensaje": "b"}, {"mensaje": "c"}],
            database_url=db_url,
            settings=settings,
        )


def test_cancelled_session_is_refused(engine: sa.Engine, settings: Settings) -> None:
    with engine.begin() as conn:
        conn.execute(
            sesiones_envio.insert().values(nombre="old", estado=CANCELADA, creado_at=db.db_now(conn))
        )
        conn.execute(
            sesiones_envio.insert().values(nombre="paused", estado=PAUSADA, creado_at=db.db_now(conn))
        )
    msg = [{"telefono": "+51987654321", "mensaje": "a"}]
    with pytest.raises(InputError, match="cancelled"):
        enq.enqueue("old", msg, engine=engine, settings=settings)
    assert count(engine, cola_envios) == 0
    assert enq.enqueue("paused", msg, engine=engine, settings=settings).inserted == 1


def _many(n: int) -> str:
    lines = ["cliente_id,telefono,mensaje"]
    lines += [f"c{i},+5198{i:07d},Recordatorio número {i}" for i in range(n)]
    return "\n".join(lines) + "\n"


def test_10000_rows_in_one_transaction(engine: sa.Engine, settings: Settings) -> None:
    rows, errs = csv_rows(_many(10_000))
    assert errs == [] and len(rows) == 10_000
    commits: list[Any] = []

    def on_commit(conn: Any) -> None:
        commits.append(conn)

    sa.event.listen(engine, "commit", on_commit)
    try:
        result = import_rows("big", rows, engine=engine, settings=settings)
    finally:
        sa.event.remove(engine, "commit", on_commit)
    assert result.inserted == 10_000
    assert count(engine, cola_envios) == 10_000
    assert len(commits) == 1


def test_failure_late_in_a_big_import_leaves_nothing(
    engine: sa.Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, _ = csv_rows(_many(3 * enq.CHUNK))
    calls = {"n": 0}

    def advance(self: Any, n: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # after two chunks were inserted
            raise RuntimeError("boom")

    monkeypatch.setattr(enq._Progress, "advance", advance)
    with pytest.raises(RuntimeError, match="boom"):
        import_rows("big", rows, engine=engine, settings=settings)
    assert count(engine, cola_envios) == 0
    assert count(engine, sesiones_envio) == 0


def test_expiry_in_the_past_by_the_database_clock(engine: sa.Engine, settings: Settings) -> None:
    with engine.connect() as conn:
        now = db.db_now(conn)
    past = (now - dt.timedelta(minutes=1)).isoformat()
    with pytest.raises(InvalidRowsError, match=r"line 1: enviar_hasta: already past"):
        enq.enqueue(
            "s",
            [{"telefono": "+51987654321", "mensaje": "a", "enviar_hasta": past}],
            engine=engine,
            settings=settings,
        )


def test_a_key_committed_after_the_pre_select_is_skipped_and_not_counted(
    engine: sa.Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if another import committed "k-2" between our pre-select and our insert:
    # the dialect's on-conflict clause must skip it without failing the import.
    enq.enqueue(
        "other",
        [{"telefono": "+51987654399", "mensaje": "first", "clave": "k-2"}],
        engine=engine,
        settings=settings,
    )
    monkeypatch.setattr(enq, "_existing_keys", lambda conn, keys: set())
    msgs = [{"telefono": f"+5198765432{i}", "mensaje": f"m{i}", "clave": f"k-{i}"} for i in range(1, 4)]
    result = enq.enqueue("s", msgs, engine=engine, settings=settings)
    assert (result.inserted, result.already_queued) == (2, 1)
    with engine.connect() as conn:
        kept = conn.execute(sa.select(cola_envios.c.payload).where(cola_envios.c.clave == "k-2")).scalar_one()
    assert json.loads(kept) == {"text": "first"}  # the existing row is untouched
    assert count(engine, cola_envios) == 3
