"""A connection the server drops under a run (crash, restart, a DBA's kill) is
"database unreachable" (exit 3), not an unexpected error with a traceback."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker import db
from worker.errors import DatabaseUnreachable


@pytest.mark.parametrize("backend", ["mysql", "postgresql"])
def test_a_connection_killed_by_the_server_is_database_unreachable(db_url: str, backend: str) -> None:
    victim = db.create_engine(db_url, pool_size=1)
    killer = db.create_engine(db_url, pool_size=1)
    try:
        with victim.connect() as conn:
            if backend == "mysql":
                own = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one()
                kill = sa.text(f"KILL CONNECTION {int(own)}")
            else:
                own = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                kill = sa.text(f"SELECT pg_terminate_backend({int(own)})")
            with killer.connect() as other:
                other.execute(kill)
                other.commit()
            with pytest.raises(sa.exc.DBAPIError) as lost:
                conn.execute(sa.text("SELECT 1")).scalar_one()
        translated = db.translate_error(lost.value)
        assert isinstance(translated, DatabaseUnreachable), (type(lost.value.orig), str(lost.value.orig))
        assert translated.exit_code == 3
    finally:
        victim.dispose()
        killer.dispose()
