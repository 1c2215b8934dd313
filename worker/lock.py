"""The per-host file lock: one `run` per lock file at a time.

``fcntl.flock(LOCK_EX | LOCK_NB)`` on a file opened with ``O_NOFOLLOW`` in a
private directory. The kernel releases the lock when the holder dies (even by
SIGKILL), so a stale lock never blocks the next run. The file holds the
holder's pid, host and start time for the one that is refused.

What is refused (``ConfigError``, exit 2, naming ``COLA_LOCK_FILE``), because
someone else could otherwise replace, hold or redirect the lock, or the lock
could destroy another file:

- a directory that is group- or world-writable, or owned by another user
  (root excepted);
- a symbolic link (``O_NOFOLLOW``), a hard link (more than one name: writing
  the holder would truncate the other name's file), anything that is not a
  regular file (a FIFO is opened with ``O_NONBLOCK`` and refused, so neither
  ``run`` nor ``lock status`` ever hangs on it).

Imported on the fast path, before any heavy import: standard library only.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any

from worker.errors import ConfigError, UsageError


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int | None
    host: str | None
    started: str | None

    def describe(self) -> str:
        pid = self.pid if self.pid is not None else "?"
        started = self.started or "unknown time"
        host = f" on {self.host}" if self.host else ""
        return f"pid {pid}{host}, started {started}"

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "started": self.started}


class FileLock:
    """A held lock. Closing the descriptor (or dying) releases it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_directory(path: str, *, create: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if create and not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"COLA_LOCK_FILE: cannot create directory {directory!r}: {exc.strerror}"
            ) from None
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"COLA_LOCK_FILE: directory {directory!r}: {exc.strerror}") from None
    writable = [who for bit, who in ((stat.S_IWOTH, "world"), (stat.S_IWGRP, "group")) if st.st_mode & bit]
    if writable:
        raise ConfigError(
            f"COLA_LOCK_FILE: directory {directory!r} is {writable[0]}-writable; "
            "put the lock file in a private directory (others could replace it there)"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"COLA_LOCK_FILE: directory {directory!r} is owned by uid {st.st_uid}, not by this user; "
            "put the lock file in a private directory of your own (its owner could hold or replace it)"
        )


def _open(path: str, flags: int) -> int:
    """Open the lock file; refuse anything but a regular file with one name.
    ``O_NONBLOCK``: opening a FIFO must not wait for a writer."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"COLA_LOCK_FILE: {path!r} is a symbolic link; refused") from None
        raise ConfigError(f"COLA_LOCK_FILE: cannot open {path!r}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"COLA_LOCK_FILE: {path!r} is not a regular file; refused")
    if st.st_nlink > 1:
        os.close(fd)
        raise ConfigError(
            f"COLA_LOCK_FILE: {path!r} has {st.st_nlink} hard links (it is also another file's name); "
            "refused, the lock would overwrite that file"
        )
    return fd


def _read_holder(fd: int) -> Holder:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode("utf-8", "replace")
        data = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        data = {}
    pid = data.get("pid")
    return Holder(
        pid=pid if isinstance(pid, int) else None,
        host=data.get("host") if isinstance(data.get("host"), str) else None,
        started=data.get("started") if isinstance(data.get("started"), str) else None,
    )


def acquire(path: str, timeout: float = 0.0, *, mode: str = "run") -> FileLock | Holder:
    """Take the lock, waiting up to ``timeout`` seconds. Returns the lock, or
    the holder when another process keeps it."""
    _check_directory(path, create=True)
    deadline = time.monotonic() + timeout
    while True:
        fd = _open(path, os.O_RDWR | os.O_CREAT)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    return holder
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if _same_file(fd, path):
            break
        # The file we locked was removed (`lock release`) or replaced while we
        # waited: a lock on it would exclude nobody. Start over on the path.
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": mode,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return FileLock(path, fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        on_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_path.st_dev, on_path.st_ino)


def _flock_on(path: str) -> bool | None:
    """Whether some process holds an flock on ``path``, read from Linux's
    /proc/locks without touching the lock (None: cannot tell this way)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 26252 fe:00:2147166 0 EOF"; waiters read "1: -> FLOCK ..."
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                return True
        except ValueError:
            continue
    return False


def status(path: str) -> tuple[bool, Holder | None]:
    """(held, holder). A missing file is not held. Looking never takes the
    lock where /proc/locks can answer, so a run starting at that instant is
    not turned away."""
    if os.path.isdir(os.path.dirname(os.path.abspath(path))):
        _check_directory(path, create=False)  # say what a run would refuse
    if not os.path.lexists(path):
        return False, None
    fd = _open(path, os.O_RDONLY)
    try:
        held = _flock_on(path)
        if held is not None:
            return held, _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, _read_holder(fd)
    finally:
        os.close(fd)


def release_stale(path: str) -> bool:
    """Remove a lock file that no process holds. Refuses (UsageError, exit 2)
    while a live process holds it: deleting it would let a second run start.
    Returns False when there was no file."""
    if os.path.isdir(os.path.dirname(os.path.abspath(path))):
        _check_directory(path, create=False)  # say what a run would refuse
    if not os.path.lexists(path):
        return False
    fd = _open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise UsageError(
                f"lock {path} is held by a live process ({holder.describe()}); refused"
            ) from None
        # Still holding it: nobody can take it between the check and the unlink.
        os.unlink(path)
        return True
    finally:
        os.close(fd)
