"""hardening: exact keys, per-run lease, journal origin, pruned keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types of worker.schema at this revision.
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _exact(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def _is_mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if _is_mysql():
        # Byte-for-byte comparison of dedupe keys and claim tokens (the table's
        # default collation is case-insensitive). PostgreSQL and SQLite already are.
        op.alter_column(
            "cola_envios", "clave", existing_type=sa.String(128), type_=_exact(128), existing_nullable=False
        )
        op.alter_column(
            "cola_envios",
            "claim_token",
            existing_type=sa.String(32),
            type_=_exact(32),
            existing_nullable=True,
        )
    with op.batch_alter_table("ejecuciones") as batch:
        batch.add_column(sa.Column("lease_segundos", sa.Float(), nullable=False, server_default="300"))
    with op.batch_alter_table("intentos_envio") as batch:
        batch.add_column(sa.Column("origen", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("nota", sa.String(length=255), nullable=True))
    op.create_table(
        "claves_podadas",
        sa.Column("clave", _exact(128), nullable=False),
        sa.Column("podada_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("clave", name=op.f("pk_claves_podadas")),
    )
    op.create_index("ix_claves_podadas_podada_at", "claves_podadas", ["podada_at"], unique=False)


def downgrade() -> None:
    op.drop_table("claves_podadas")
    with op.batch_alter_table("intentos_envio") as batch:
        batch.drop_column("nota")
        batch.drop_column("origen")
    with op.batch_alter_table("ejecuciones") as batch:
        batch.drop_column("lease_segundos")
    if _is_mysql():
        op.alter_column(
            "cola_envios",
            "claim_token",
            existing_type=_exact(32),
            type_=sa.String(32),
            existing_nullable=True,
        )
        op.alter_column(
            "cola_envios", "clave", existing_type=_exact(128), type_=sa.String(128), existing_nullable=False
        )
