"""Models and migrations agree, on every backend; downgrade then upgrade round-trips."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from worker import db
from worker.schema import metadata

TABLES = {
    "sesiones_envio",
    "cola_envios",
    "envios_whatsapp",
    "intentos_envio",
    "ejecuciones",
    "claves_podadas",
    "estados_entrega",
    "solicitudes_baja",
}


def _diff(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_models_and_migrations_agree(empty_db_url: str) -> None:
    engine = db.create_engine(empty_db_url)
    try:
        db.upgrade(engine)
        assert _diff(engine) == []
        names = set(sa.inspect(engine).get_table_names())
        assert names >= TABLES
    finally:
        engine.dispose()


def test_claim_index_and_unique_keys(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        insp = sa.inspect(engine)
        indexes = {i["name"]: i["column_names"] for i in insp.get_indexes("cola_envios")}
        assert indexes["ix_cola_envios_claim"] == ["estado", "proximo_intento_at", "id"]
        uniques = [u["column_names"] for u in insp.get_unique_constraints("cola_envios")]
        uniques += [i["column_names"] for i in insp.get_indexes("cola_envios") if i.get("unique")]
        assert ["clave"] in uniques
        ew = [u["column_names"] for u in insp.get_unique_constraints("envios_whatsapp")]
        ew += [i["column_names"] for i in insp.get_indexes("envios_whatsapp") if i.get("unique")]
        assert ["cola_envio_id"] in ew
    finally:
        engine.dispose()


def test_downgrade_then_upgrade_round_trips(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        db.downgrade(engine, "base")
        assert set(sa.inspect(engine).get_table_names()) & TABLES == set()
        with engine.connect() as conn:
            assert db.current_revision(conn) is None
        db.upgrade(engine)
        with engine.connect() as conn:
            assert db.current_revision(conn) == db.head_revision()
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_check_schema_refuses_missing_and_behind(empty_db_url: str) -> None:
    import pytest

    from worker.errors import SchemaError

    engine = db.create_engine(empty_db_url)
    try:
        with pytest.raises(SchemaError, match="no cola-worker schema"):
            db.check_schema(engine)
        db.upgrade(engine)
        db.check_schema(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
        with pytest.raises(SchemaError, match="not at the latest migration"):
            db.check_schema(engine)
    finally:
        engine.dispose()


def test_head_is_read_without_alembic_and_agrees_with_it(sqlite_db_url: str) -> None:
    import subprocess
    import sys

    assert db.head_revision() == db._alembic_head()
    # Every run checks the schema first: without importing Alembic (a third of a cron run's start-up).
    code = (
        "import sys; from worker import db; "
        f"db.check_schema(db.create_engine({sqlite_db_url!r})); "
        "print('alembic' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
