"""cola-worker: send WhatsApp messages queued in a database table, each exactly once.

Kept light on purpose: `cola-worker run` takes its file lock before importing
SQLAlchemy or httpx, so the public API below is imported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "enqueue"]


def version() -> str:
    """The installed distribution's version (``pyproject.toml``), read from
    its metadata; "unknown" when the package is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("cola-worker")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # lazily: importlib.metadata is not needed on the lock fast path
        return version()
    if name == "enqueue":
        from worker.importer import enqueue

        return enqueue
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
