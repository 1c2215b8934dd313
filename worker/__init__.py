"""cola-worker: send WhatsApp messages queued in a database table, each exactly once.

Kept light on purpose: `cola-worker run` takes its file lock before importing
SQLAlchemy or httpx, so the public API below is imported lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "enqueue"]


def __getattr__(name: str) -> Any:
    if name == "enqueue":
        from worker.importer import enqueue

        return enqueue
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
