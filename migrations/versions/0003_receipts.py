"""receipts: delivery state on the row, delivery statuses, opt-out requests

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types of worker.schema at this revision.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _exact(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


_DELIVERY_COLUMNS = (
    ("entrega_estado", sa.String(16)),
    ("entrega_enviado_at", Timestamp),
    ("entrega_entregado_at", Timestamp),
    ("entrega_leido_at", Timestamp),
    ("entrega_fallido_at", Timestamp),
    ("entrega_codigo", sa.String(32)),
)


def upgrade() -> None:
    with op.batch_alter_table("cola_envios") as batch:
        for name, type_ in _DELIVERY_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
        batch.create_index("ix_cola_envios_proveedor_msg_id", ["proveedor_msg_id"], unique=False)
    op.create_table(
        "estados_entrega",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("proveedor", sa.String(32), nullable=False),
        sa.Column("proveedor_msg_id", _exact(128), nullable=False),
        sa.Column("estado", sa.String(16), nullable=False),
        sa.Column("cola_envio_id", sa.BigInteger(), nullable=True),
        sa.Column("codigo", sa.String(32), nullable=True),
        sa.Column("ocurrido_at", Timestamp, nullable=True),
        sa.Column("recibido_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_estados_entrega")),
        sa.UniqueConstraint(
            "proveedor_msg_id", "estado", name=op.f("uq_estados_entrega_proveedor_msg_id_estado")
        ),
    )
    op.create_index("ix_estados_entrega_cola", "estados_entrega", ["cola_envio_id"], unique=False)
    op.create_table(
        "solicitudes_baja",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("proveedor", sa.String(32), nullable=False),
        sa.Column("proveedor_msg_id", _exact(128), nullable=False),
        sa.Column("telefono", sa.String(20), nullable=False),
        sa.Column("remitente", sa.String(64), nullable=True),
        sa.Column("palabra", sa.String(32), nullable=False),
        sa.Column("recibido_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_solicitudes_baja")),
        sa.UniqueConstraint("proveedor_msg_id", name=op.f("uq_solicitudes_baja_proveedor_msg_id")),
    )
    op.create_index("ix_solicitudes_baja_telefono", "solicitudes_baja", ["telefono"], unique=False)


def downgrade() -> None:
    op.drop_table("solicitudes_baja")
    op.drop_table("estados_entrega")
    with op.batch_alter_table("cola_envios") as batch:
        batch.drop_index("ix_cola_envios_proveedor_msg_id")
        for name, _ in reversed(_DELIVERY_COLUMNS):
            batch.drop_column(name)
