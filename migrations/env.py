"""Alembic environment. The URL comes from the Config attribute ``connection``
(set by ``cola-worker db ...``), or from COLA_DATABASE_URL for plain ``alembic``."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from worker.schema import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    from worker.db import create_engine_from_settings
    from worker.settings import load_settings

    engine = create_engine_from_settings(load_settings())
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; connect to the database")
run_migrations_online()
