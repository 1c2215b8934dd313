"""The local outcome spool: provider answers kept on disk until recorded.

Every provider answer is appended to this file (JSON Lines, ``fsync``'ed)
before its database write. When the write succeeds the entry is dropped (the
file is truncated once nothing is outstanding, or compacted when it grows).
If the run cannot record an answer (the database is down for longer than the
run's lease) the entry stays, and the next run on this host replays it before
its recovery (:meth:`worker.queue.QueueRepository.replay`): an accepted
message becomes ``enviado`` instead of ``incierto``.

The spool lives next to the file lock (``<lock file>.spool``), so exactly one
run on the host uses it at a time. It holds job ids, claim tokens and the
provider's answer (message id, HTTP status, code), never a phone number or a
message body.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from worker.errors import ConfigError
from worker.queue import Outcome

logger = logging.getLogger(__name__)

# Rewrite the file with only the outstanding entries once it is this large.
COMPACT_BYTES = 1 << 20


def spool_path(lock_file: str) -> str:
    """Where the spool of the run holding ``lock_file`` lives."""
    return lock_file + ".spool"


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One provider answer of one attempt (a row under one claim token)."""

    job_id: int
    token: str
    run_id: int
    provider: str
    started_at: dt.datetime  # the journal's inicio_at (database clock)
    latency_ms: int
    intentos: int  # the row's attempts when it was claimed
    outcome: Outcome
    spooled_at: dt.datetime | None = None

    @property
    def key(self) -> tuple[int, str]:
        return (self.job_id, self.token)

    def to_json(self) -> str:
        o = self.outcome
        spooled = self.spooled_at or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        data: dict[str, Any] = {
            "job_id": str(self.job_id),
            "claim_token": self.token,
            "run_id": self.run_id,
            "provider": self.provider,
            "kind": o.resultado,
            "estado": o.estado,
            "spend_attempt": o.spend_attempt,
            "delay": o.delay,
            "message_id": o.message_id,
            "http_status": o.http_status,
            "code": o.code,
            "text": o.text,
            "intentos": self.intentos,
            "started_at": self.started_at.isoformat(timespec="microseconds"),
            "latency_ms": self.latency_ms,
            "spooled_at": spooled.isoformat(timespec="microseconds"),
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> SpoolEntry:
        d = json.loads(line)
        if not isinstance(d, dict):
            raise ValueError("not an object")
        outcome = Outcome(
            estado=str(d["estado"]),
            resultado=str(d["kind"]),
            spend_attempt=bool(d["spend_attempt"]),
            delay=None if d.get("delay") is None else float(d["delay"]),
            code=d.get("code"),
            text=d.get("text"),
            http_status=None if d.get("http_status") is None else int(d["http_status"]),
            message_id=d.get("message_id"),
        )
        spooled = d.get("spooled_at")
        return cls(
            job_id=int(d["job_id"]),
            token=str(d["claim_token"]),
            run_id=int(d["run_id"]),
            provider=str(d["provider"]),
            started_at=dt.datetime.fromisoformat(d["started_at"]),
            latency_ms=int(d.get("latency_ms") or 0),
            intentos=int(d["intentos"]),
            outcome=outcome,
            spooled_at=dt.datetime.fromisoformat(spooled) if spooled else None,
        )


class OutcomeSpool:
    """The spool file of one run. Thread-safe; :meth:`append` is durable
    (written and ``fsync``'ed) when it returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._outstanding: dict[tuple[int, str], str] = {}
        self._size = 0
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(
                    f"COLA_LOCK_FILE: outcome spool {self.path!r} is a symbolic link; refused"
                ) from None
            raise ConfigError(
                f"COLA_LOCK_FILE: cannot open the outcome spool {self.path!r}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"COLA_LOCK_FILE: outcome spool {self.path!r} is not a regular file")
        return fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # --- what a previous run left ------------------------------------------

    def pending(self) -> list[SpoolEntry]:
        """The entries on disk (a previous run's unrecorded answers). A torn
        last line (a crash mid-write) is skipped: its answer never reached
        the spool's promise (append had not returned)."""
        with self._lock:
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while True:
                chunk = os.read(self._fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        entries: dict[tuple[int, str], SpoolEntry] = {}
        # Split on "\n" only: str.splitlines() would also split an entry whose
        # provider text holds U+2028, U+2029 or U+0085 (json.dumps leaves them as they are).
        for n, raw in enumerate(b"".join(chunks).decode("utf-8", "replace").split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                entry = SpoolEntry.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning(
                    "outcome spool %s: line %d is unreadable (%s): skipped",
                    self.path,
                    n,
                    type(exc).__name__,
                    extra={"action": "spool"},
                )
                continue
            entries[entry.key] = entry
        return list(entries.values())

    def clear(self) -> None:
        """Drop everything on disk (the previous run's entries were replayed)."""
        with self._lock:
            if self._outstanding:
                raise RuntimeError("the outcome spool has answers of this run outstanding")
            self._truncate()

    # --- this run ------------------------------------------------------------

    def append(self, entries: Iterable[SpoolEntry]) -> None:
        """Write the entries not already outstanding, one write and one fsync."""
        with self._lock:
            lines = []
            for entry in entries:
                if entry.key in self._outstanding:
                    continue
                line = entry.to_json() + "\n"
                self._outstanding[entry.key] = line
                lines.append(line)
            if not lines:
                return
            data = "".join(lines).encode("utf-8")
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self._size += len(data)

    def recorded(self, keys: Sequence[tuple[int, str]]) -> None:
        """These answers are in the database: drop them."""
        with self._lock:
            for key in keys:
                self._outstanding.pop(key, None)
            if not self._outstanding:
                if self._size:
                    self._truncate()
            elif self._size > COMPACT_BYTES:
                self._compact()

    def outstanding(self) -> int:
        with self._lock:
            return len(self._outstanding)

    def _truncate(self) -> None:
        # No fsync: if the truncation is lost, the next run replays answers
        # that are already recorded, which changes nothing.
        os.ftruncate(self._fd, 0)
        self._size = 0

    def _compact(self) -> None:
        """Rewrite the file with only the outstanding entries (write a new
        file, fsync, rename over the old one)."""
        tmp = self.path + ".tmp"
        data = "".join(self._outstanding.values()).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        os.close(self._fd)
        self._fd = self._open()
        self._size = len(data)


__all__ = ["OutcomeSpool", "SpoolEntry", "spool_path"]
