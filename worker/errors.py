"""The project's exceptions. Each carries the exit code the CLI uses for it;
the docstring is the default message. Foreign errors (driver, HTTP) are
translated at the edge with ``raise ... from exc``.

ColaError
 +-- UsageError (2)          bad usage, configuration or input
 |    +-- ConfigError (2)    a bad or missing setting (names the variable)
 |    +-- InputError (2)     bad enqueue input (names field and line)
 |    +-- SchemaError (2)    schema missing or not at the latest migration
 |    +-- AccessDenied (2)   the database refused the credentials
 +-- DatabaseUnreachable (3)
 +-- SenderBlockedError (4)  the provider refused the credentials or blocked the sender
 +-- AuditFailed (5)
 +-- ProviderUnreachable (6) connections to the provider failed before anything was sent
"""

from __future__ import annotations


class ColaError(Exception):
    """cola-worker failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(ColaError):
    """Bad usage."""

    exit_code = 2


class ConfigError(UsageError):
    """Bad configuration."""


class InputError(UsageError):
    """Bad input."""


class SchemaError(UsageError):
    """The database schema is not at the latest migration; run `cola-worker db upgrade`."""


class AccessDenied(UsageError):
    """The database refused the credentials."""


class DatabaseUnreachable(ColaError):
    """The database cannot be reached."""

    exit_code = 3


class SenderBlockedError(ColaError):
    """The provider refused the credentials or blocked the sender."""

    exit_code = 4


class AuditFailed(ColaError):
    """The audit found problems."""

    exit_code = 5


class ProviderUnreachable(ColaError):
    """The provider could not be reached: connections failed before anything
    was sent; the run's rows went back to pendiente untouched."""

    exit_code = 6
