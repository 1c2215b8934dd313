"""The tables (docs/design.md section 5). Alembic owns the schema; these models are
what the migrations must produce (``tests/migration`` checks it).

Names stay in Spanish, as in the existing database. Timestamps are naive UTC
with microseconds, written from the database's clock (see ``worker.db.db_now``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

# Microsecond precision everywhere (MySQL's DATETIME defaults to seconds).
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def ExactString(length: int) -> sa.types.TypeEngine[str]:
    """A string compared byte for byte on every backend.

    MariaDB/MySQL compare with the table's collation, which is case-insensitive
    by default: dedupe keys and claim tokens must not be. PostgreSQL and SQLite
    already compare exactly.
    """
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


# Row states of cola_envios (docs/design.md section 3).
PENDIENTE = "pendiente"
PROCESANDO = "procesando"
ENVIANDO = "enviando"
ENVIADO = "enviado"
ERROR = "error"
INCIERTO = "incierto"
CANCELADO = "cancelado"
STATES = (PENDIENTE, PROCESANDO, ENVIANDO, ENVIADO, ERROR, INCIERTO, CANCELADO)
FINAL_STATES = (ENVIADO, ERROR, INCIERTO, CANCELADO)

# Session states.
ACTIVA = "activa"
PAUSADA = "pausada"
CANCELADA = "cancelada"
SESSION_STATES = (ACTIVA, PAUSADA, CANCELADA)

sesiones_envio = sa.Table(
    "sesiones_envio",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("nombre", sa.String(200), nullable=False),
    sa.Column("estado", sa.String(16), nullable=False, server_default=ACTIVA),
    sa.Column("creado_at", Timestamp, nullable=False),
    sa.UniqueConstraint("nombre"),
)

cola_envios = sa.Table(
    "cola_envios",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("sesion_id", BigId, sa.ForeignKey("sesiones_envio.id"), nullable=False),
    sa.Column("cliente_id", sa.String(64), nullable=False),
    sa.Column("cliente_nombre", sa.String(200), nullable=True),
    sa.Column("telefono", sa.String(20), nullable=False),  # E.164
    sa.Column("remitente", sa.String(64), nullable=True),  # sender; NULL = configured default
    sa.Column("tipo", sa.String(10), nullable=False),  # text | template
    sa.Column("payload", sa.Text(), nullable=False),  # JSON
    sa.Column("estado", sa.String(16), nullable=False, server_default=PENDIENTE),
    sa.Column("intentos", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("max_intentos", sa.Integer(), nullable=False),
    sa.Column("proximo_intento_at", Timestamp, nullable=False),
    sa.Column("enviar_hasta", Timestamp, nullable=True),
    sa.Column("clave", ExactString(128), nullable=False),  # dedupe key
    sa.Column("claim_token", ExactString(32), nullable=True),
    # The owning run. No foreign key on purpose: InnoDB would take a shared
    # lock on the ejecuciones row at every claim, against the heartbeat.
    sa.Column("ejecucion_id", sa.BigInteger(), nullable=True),
    sa.Column("reclamado_at", Timestamp, nullable=True),
    sa.Column("enviado_at", Timestamp, nullable=True),
    sa.Column("proveedor", sa.String(32), nullable=True),
    sa.Column("proveedor_msg_id", sa.String(128), nullable=True),
    sa.Column("error_codigo", sa.String(32), nullable=True),
    sa.Column("error_texto", sa.String(1000), nullable=True),
    sa.Column("creado_at", Timestamp, nullable=False),
    sa.Column("actualizado_at", Timestamp, nullable=False),
    # Delivery, from the provider's status callbacks (``cola-worker receipts``):
    # the furthest state seen (sent < delivered < read; failed), when each was
    # first seen, and the failure code.
    sa.Column("entrega_estado", sa.String(16), nullable=True),
    sa.Column("entrega_enviado_at", Timestamp, nullable=True),
    sa.Column("entrega_entregado_at", Timestamp, nullable=True),
    sa.Column("entrega_leido_at", Timestamp, nullable=True),
    sa.Column("entrega_fallido_at", Timestamp, nullable=True),
    sa.Column("entrega_codigo", sa.String(32), nullable=True),
    sa.UniqueConstraint("clave"),
    # The claim walks this index in order: WHERE estado=? AND proximo_intento_at<=?
    # ORDER BY proximo_intento_at, id. No filesort, so SKIP LOCKED locks only what it takes.
    sa.Index("ix_cola_envios_claim", "estado", "proximo_intento_at", "id"),
    sa.Index("ix_cola_envios_sesion_claim", "sesion_id", "estado", "proximo_intento_at", "id"),
    sa.Index("ix_cola_envios_ejecucion", "ejecucion_id", "estado"),
    # Receipts match a status to its row by the provider's message id too.
    sa.Index("ix_cola_envios_proveedor_msg_id", "proveedor_msg_id"),
)

envios_whatsapp = sa.Table(
    "envios_whatsapp",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("cola_envio_id", sa.BigInteger(), nullable=False),
    sa.Column("sesion_id", sa.BigInteger(), nullable=False),
    sa.Column("cliente_id", sa.String(64), nullable=False),
    sa.Column("telefono", sa.String(20), nullable=False),
    sa.Column("proveedor", sa.String(32), nullable=False),
    sa.Column("proveedor_msg_id", sa.String(128), nullable=True),
    sa.Column("fecha_envio", Timestamp, nullable=False),
    sa.UniqueConstraint("cola_envio_id"),
    sa.Index("ix_envios_whatsapp_cliente", "cliente_id", "fecha_envio"),
    sa.Index("ix_envios_whatsapp_telefono", "telefono", "fecha_envio"),
)

intentos_envio = sa.Table(
    "intentos_envio",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("cola_envio_id", sa.BigInteger(), nullable=False),
    sa.Column("ejecucion_id", sa.BigInteger(), nullable=True),
    sa.Column("inicio_at", Timestamp, nullable=False),
    sa.Column("fin_at", Timestamp, nullable=True),
    # accepted | throttled | retryable | permanent | ambiguous | sender_blocked
    sa.Column("resultado", sa.String(16), nullable=False),
    sa.Column("http_status", sa.Integer(), nullable=True),
    sa.Column("codigo", sa.String(32), nullable=True),
    sa.Column("latencia_ms", sa.Integer(), nullable=True),
    sa.Column("proveedor_msg_id", sa.String(128), nullable=True),
    # Where the outcome came from: NULL = the run's own answer; "spool" = replayed
    # from the local outcome spool; later "manual" (resolve) and "receipt".
    sa.Column("origen", sa.String(16), nullable=True),
    sa.Column("nota", sa.String(255), nullable=True),  # who / why, for non-run outcomes
    sa.Index("ix_intentos_envio_cola", "cola_envio_id"),
)

ejecuciones = sa.Table(
    "ejecuciones",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("modo", sa.String(16), nullable=False),
    sa.Column("iniciada_at", Timestamp, nullable=False),
    sa.Column("latido_at", Timestamp, nullable=False),  # heartbeat
    sa.Column("finalizada_at", Timestamp, nullable=True),
    sa.Column("estado", sa.String(16), nullable=False),  # activa | terminada | fallida | muerta
    # The run's own lease: recovery judges this run by it, not by the caller's setting.
    sa.Column("lease_segundos", sa.Float(), nullable=False, server_default="300"),
    sa.Column("reclamados", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("enviados", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("errores", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("inciertos", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("reintentos", sa.Integer(), nullable=False, server_default="0"),
    sa.Index("ix_ejecuciones_vivas", "finalizada_at", "latido_at"),
)

# Dedupe keys of pruned rows, kept for a horizon longer than the pruning age so
# that re-importing an old file inserts nothing twice (``prune`` writes them,
# ``enqueue`` reads them).
claves_podadas = sa.Table(
    "claves_podadas",
    metadata,
    sa.Column("clave", ExactString(128), primary_key=True),
    sa.Column("podada_at", Timestamp, nullable=False),
    sa.Index("ix_claves_podadas_podada_at", "podada_at"),
)

# Delivery statuses from the providers' callbacks, each stored once per message
# (``cola-worker receipts``). ``cola_envio_id`` is NULL for a message id we do
# not know (acknowledged, counted, kept).
estados_entrega = sa.Table(
    "estados_entrega",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("proveedor", sa.String(32), nullable=False),
    sa.Column("proveedor_msg_id", ExactString(128), nullable=False),
    sa.Column("estado", sa.String(16), nullable=False),  # the provider's own word (sent, delivered, ...)
    sa.Column("cola_envio_id", sa.BigInteger(), nullable=True),
    sa.Column("codigo", sa.String(32), nullable=True),  # failure code (Meta 131026, Twilio 63016, ...)
    sa.Column("ocurrido_at", Timestamp, nullable=True),  # the provider's timestamp, when it gives one
    sa.Column("recibido_at", Timestamp, nullable=False),
    sa.UniqueConstraint("proveedor_msg_id", "estado"),
    sa.Index("ix_estados_entrega_cola", "cola_envio_id"),
)

# Inbound messages that ask for no more messages (an opt-out word). Opt-outs
# themselves are a later feature: this journal is what it will build on.
solicitudes_baja = sa.Table(
    "solicitudes_baja",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("proveedor", sa.String(32), nullable=False),
    sa.Column("proveedor_msg_id", ExactString(128), nullable=False),  # the inbound message's id
    sa.Column("telefono", sa.String(20), nullable=False),  # who wrote (E.164)
    sa.Column("remitente", sa.String(64), nullable=True),  # our sender they wrote to
    sa.Column("palabra", sa.String(32), nullable=False),
    sa.Column("recibido_at", Timestamp, nullable=False),
    sa.UniqueConstraint("proveedor_msg_id"),
    sa.Index("ix_solicitudes_baja_telefono", "telefono"),
)
