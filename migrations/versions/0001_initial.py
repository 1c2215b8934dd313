"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types of worker.schema at this revision.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ejecuciones",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("modo", sa.String(length=16), nullable=False),
        sa.Column("iniciada_at", Timestamp, nullable=False),
        sa.Column("latido_at", Timestamp, nullable=False),
        sa.Column("finalizada_at", Timestamp, nullable=True),
        sa.Column("estado", sa.String(length=16), nullable=False),
        sa.Column("reclamados", sa.Integer(), server_default="0", nullable=False),
        sa.Column("enviados", sa.Integer(), server_default="0", nullable=False),
        sa.Column("errores", sa.Integer(), server_default="0", nullable=False),
        sa.Column("inciertos", sa.Integer(), server_default="0", nullable=False),
        sa.Column("reintentos", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ejecuciones")),
    )
    op.create_index("ix_ejecuciones_vivas", "ejecuciones", ["finalizada_at", "latido_at"], unique=False)
    op.create_table(
        "envios_whatsapp",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("cola_envio_id", sa.BigInteger(), nullable=False),
        sa.Column("sesion_id", sa.BigInteger(), nullable=False),
        sa.Column("cliente_id", sa.String(length=64), nullable=False),
        sa.Column("telefono", sa.String(length=20), nullable=False),
        sa.Column("proveedor", sa.String(length=32), nullable=False),
        sa.Column("proveedor_msg_id", sa.String(length=128), nullable=True),
        sa.Column("fecha_envio", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_envios_whatsapp")),
        sa.UniqueConstraint("cola_envio_id", name=op.f("uq_envios_whatsapp_cola_envio_id")),
    )
    op.create_index(
        "ix_envios_whatsapp_cliente", "envios_whatsapp", ["cliente_id", "fecha_envio"], unique=False
    )
    op.create_index(
        "ix_envios_whatsapp_telefono", "envios_whatsapp", ["telefono", "fecha_envio"], unique=False
    )
    op.create_table(
        "intentos_envio",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("cola_envio_id", sa.BigInteger(), nullable=False),
        sa.Column("ejecucion_id", sa.BigInteger(), nullable=True),
        sa.Column("inicio_at", Timestamp, nullable=False),
        sa.Column("fin_at", Timestamp, nullable=True),
        sa.Column("resultado", sa.String(length=16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("codigo", sa.String(length=32), nullable=True),
        sa.Column("latencia_ms", sa.Integer(), nullable=True),
        sa.Column("proveedor_msg_id", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_intentos_envio")),
    )
    op.create_index("ix_intentos_envio_cola", "intentos_envio", ["cola_envio_id"], unique=False)
    op.create_table(
        "sesiones_envio",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("nombre", sa.String(length=200), nullable=False),
        sa.Column("estado", sa.String(length=16), server_default="activa", nullable=False),
        sa.Column("creado_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sesiones_envio")),
        sa.UniqueConstraint("nombre", name=op.f("uq_sesiones_envio_nombre")),
    )
    op.create_table(
        "cola_envios",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("sesion_id", BigId, nullable=False),
        sa.Column("cliente_id", sa.String(length=64), nullable=False),
        sa.Column("cliente_nombre", sa.String(length=200), nullable=True),
        sa.Column("telefono", sa.String(length=20), nullable=False),
        sa.Column("remitente", sa.String(length=64), nullable=True),
        sa.Column("tipo", sa.String(length=10), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("estado", sa.String(length=16), server_default="pendiente", nullable=False),
        sa.Column("intentos", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_intentos", sa.Integer(), nullable=False),
        sa.Column("proximo_intento_at", Timestamp, nullable=False),
        sa.Column("enviar_hasta", Timestamp, nullable=True),
        sa.Column("clave", sa.String(length=128), nullable=False),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("ejecucion_id", sa.BigInteger(), nullable=True),
        sa.Column("reclamado_at", Timestamp, nullable=True),
        sa.Column("enviado_at", Timestamp, nullable=True),
        sa.Column("proveedor", sa.String(length=32), nullable=True),
        sa.Column("proveedor_msg_id", sa.String(length=128), nullable=True),
        sa.Column("error_codigo", sa.String(length=32), nullable=True),
        sa.Column("error_texto", sa.String(length=1000), nullable=True),
        sa.Column("creado_at", Timestamp, nullable=False),
        sa.Column("actualizado_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["sesion_id"], ["sesiones_envio.id"], name=op.f("fk_cola_envios_sesion_id_sesiones_envio")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cola_envios")),
        sa.UniqueConstraint("clave", name=op.f("uq_cola_envios_clave")),
    )
    op.create_index(
        "ix_cola_envios_claim", "cola_envios", ["estado", "proximo_intento_at", "id"], unique=False
    )
    op.create_index("ix_cola_envios_ejecucion", "cola_envios", ["ejecucion_id", "estado"], unique=False)
    op.create_index(
        "ix_cola_envios_sesion_claim",
        "cola_envios",
        ["sesion_id", "estado", "proximo_intento_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    # Dropping a table drops its indexes (MySQL refuses to drop an index a foreign key needs).
    for table in ("cola_envios", "sesiones_envio", "intentos_envio", "envios_whatsapp", "ejecuciones"):
        op.drop_table(table)
