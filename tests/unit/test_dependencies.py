"""Dependencies that only production would miss."""

from __future__ import annotations

from importlib.metadata import requires


def test_pymysql_comes_with_cryptography_for_mysql8_logins() -> None:
    # MySQL 8's default caching_sha2_password needs it; MariaDB does not, so only
    # production (or testcontainers) would show its absence.
    declared = {
        r.split(";")[0].split(">")[0].split("=")[0].strip().lower() for r in requires("cola-worker") or []
    }
    assert {"pymysql", "cryptography"} <= declared
    from pymysql import _auth

    assert _auth._have_cryptography  # type: ignore[attr-defined]
