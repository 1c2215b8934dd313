"""G4 with real processes: the file lock as cron and an operator meet it.

A holder process takes the lock (``worker.lock.acquire``) and keeps it; the
installed ``cola-worker`` runs against the same ``COLA_LOCK_FILE``. Every
process a test starts is its own session leader and is killed by its process
group (never by name).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import PROJECT, wait_until

from worker import lock as file_lock
from worker.errors import ConfigError
from worker.settings import default_lock_file, load_settings

_EXE = Path(sys.executable).parent / "cola-worker"
CLI = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "worker"]

# If `run` ever tried the database, this URL would fail with exit 2 naming
# COLA_DATABASE_URL; a refused run must exit 0 without looking at it.
BOGUS_DB_URL = "bogus-not-a-url"

HOLDER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from worker import lock

    path, hold, spawn = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
    got = lock.acquire(path)
    assert isinstance(got, lock.FileLock), got
    info = {"pid": __import__("os").getpid()}
    if spawn:
        # close_fds=False: only O_CLOEXEC keeps the lock descriptor out of the child.
        child = subprocess.Popen(["sleep", "120"], close_fds=False)
        info["child"] = child.pid
    print(json.dumps(info), flush=True)
    time.sleep(hold)
    got.release()
    print("released", flush=True)
    time.sleep(120)
    """
)


@dataclass
class Holder:
    proc: subprocess.Popen[str]
    pid: int
    child: int | None
    started: str

    def kill(self) -> None:
        """SIGKILL the holder itself (not its group: a child may have to outlive it)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


StartHolder = Callable[..., Holder]


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "locks"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def lock_path(lock_dir: Path) -> Path:
    return lock_dir / "run.lock"


@pytest.fixture
def start_holder(lock_path: Path) -> Iterator[StartHolder]:
    started: list[subprocess.Popen[str]] = []

    def start(hold: float = 300.0, spawn_child: bool = False, path: Path = lock_path) -> Holder:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), str(hold), "1" if spawn_child else "0"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=PROJECT,
            env={**os.environ, "PYTHONPATH": str(PROJECT)},
            start_new_session=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the holder process did not take the lock"
        info = json.loads(line)
        content = json.loads(path.read_text())
        assert content["pid"] == proc.pid == info["pid"]
        return Holder(proc, proc.pid, info.get("child"), content["started"])

    yield start
    for proc in started:
        _kill_group(proc)  # the holder and any child it spawned
        if proc.stdout is not None:
            proc.stdout.close()


def cli_env(lock_path: Path, db_url: str = BOGUS_DB_URL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update({"COLA_LOCK_FILE": str(lock_path), "COLA_DATABASE_URL": db_url, **extra})
    return env


def cola(
    env: dict[str, str], *args: str, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT, check=False
    )
    return proc, time.monotonic() - t0


def runnable_env(lock_path: Path, sqlite_db_url: str, **extra: str) -> dict[str, str]:
    """A run that can proceed: migrated SQLite, no rows, a sandbox URL nobody listens on."""
    return cli_env(
        lock_path,
        sqlite_db_url,
        COLA_PROVIDER="fake",
        COLA_FAKE_BASE_URL="http://127.0.0.1:9",
        COLA_METRICS_PORT="0",
        **extra,
    )


HELD = "another run holds the lock"


# --- a second run while one holds the lock -----------------------------------


def test_second_run_exits_zero_at_once_naming_the_holder(start_holder: StartHolder, lock_path: Path) -> None:
    holder = start_holder()
    proc, elapsed = cola(cli_env(lock_path), "run")
    assert proc.returncode == 0, proc.stderr
    assert HELD in proc.stderr
    assert f"pid {holder.pid}" in proc.stderr
    assert holder.started in proc.stderr
    assert "COLA_DATABASE_URL" not in proc.stderr  # it never looked at the database URL
    assert elapsed < 3.0, f"a refused run took {elapsed:.2f} s"  # the contract: the test below
    assert proc.stdout == ""
    # The refused run did not disturb the holder's record.
    assert json.loads(lock_path.read_text())["pid"] == holder.pid


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, bytes]:
    """Wall and CPU (user + system) seconds of one whole process, its exit code and stderr."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.monotonic() - t0, usage.ru_utime + usage.ru_stime, proc.returncode, err


CONTRACT_S = 0.5  # G4: the whole refused process ends in well under half a second
BARE_START_S = 0.1  # a generous `python -c pass` on an idle machine


def test_a_refused_run_ends_well_under_half_a_second(start_holder: StartHolder, lock_path: Path) -> None:
    """G4's contract, as the bench measures it: the median of 5 whole refused
    processes (after one warm-up) under 0.5 s. On a shared machine wall time is
    mostly waiting for a CPU or the disk, so two things keep the test strict
    and still robust under load:
    - the CPU time (user + system, which waiting does not inflate) of a refused
      run stays under half the bound in every round (it is about 0.08 s;
      importing SQLAlchemy and httpx first would cost about 0.4 s);
    - the wall-time bound is the contract scaled by the slowdown measured in the
      same round on a bare interpreter start (`python -c pass`): exactly 0.5 s
      while a bare start takes up to 0.1 s. Up to 3 rounds."""
    start_holder()
    env = cli_env(lock_path)
    bare_cmd = [str(Path(sys.executable)), "-c", "pass"]
    _timed([*CLI, "run"], env)  # page cache warm-up, not counted
    report = []
    for _ in range(3):
        walls, cpus, bares = [], [], []
        for _ in range(5):
            wall, cpu, code, err = _timed([*CLI, "run"], env)
            assert code == 0 and HELD.encode() in err, err
            walls.append(wall)
            cpus.append(cpu)
            bares.append(_timed(bare_cmd, env)[0])
        assert statistics.median(cpus) < CONTRACT_S / 2, f"CPU seconds per refused run: {cpus}"
        bound = CONTRACT_S * max(1.0, statistics.median(bares) / BARE_START_S)
        median = statistics.median(walls)
        report.append(f"median {median:.3f} s, bound {bound:.3f} s")
        if median < bound:
            return
    pytest.fail(f"a refused run is too slow, 3 rounds of 5: {report}")


def test_refused_run_never_imports_sqlalchemy_or_httpx(start_holder: StartHolder, lock_path: Path) -> None:
    start_holder()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "worker", "run"],
        env=cli_env(lock_path),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT,
        check=False,
    )
    assert proc.returncode == 0
    assert HELD in proc.stderr
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "worker" in imported  # sanity: the import log is there
    assert not imported & {"sqlalchemy", "httpx", "alembic", "pymysql"}, imported


def test_without_a_holder_the_bogus_database_url_is_reached(lock_path: Path) -> None:
    """The control for the test above: the same environment with the lock free
    does read COLA_DATABASE_URL (and fails on it)."""
    proc, _ = cola(cli_env(lock_path), "run")
    assert proc.returncode == 2
    assert "COLA_DATABASE_URL" in proc.stderr
    assert HELD not in proc.stderr


def test_lock_left_by_a_killed_holder_does_not_block_the_next_run(
    start_holder: StartHolder, lock_path: Path, sqlite_db_url: str
) -> None:
    holder = start_holder()
    env = runnable_env(lock_path, sqlite_db_url)
    refused, _ = cola(env, "run")
    assert refused.returncode == 0 and HELD in refused.stderr
    holder.kill()
    assert lock_path.exists()  # the file stays; the kernel dropped the flock
    proc, _ = cola(env, "run")
    assert proc.returncode == 0, proc.stderr
    assert HELD not in proc.stderr
    assert "run 1 started" in proc.stderr and "run 1 ended" in proc.stderr


def test_lock_timeout_waits_for_the_holder_to_release(
    start_holder: StartHolder, lock_path: Path, sqlite_db_url: str
) -> None:
    start_holder(hold=1.0)
    proc, elapsed = cola(runnable_env(lock_path, sqlite_db_url), "run", "--lock-timeout", "2")
    assert proc.returncode == 0, proc.stderr
    assert HELD not in proc.stderr
    assert "run 1 ended" in proc.stderr
    assert elapsed >= 0.8, f"the run did not wait for the holder ({elapsed:.2f} s)"


def test_lock_timeout_expires_naming_the_holder(start_holder: StartHolder, lock_path: Path) -> None:
    holder = start_holder()
    proc, elapsed = cola(cli_env(lock_path), "run", "--lock-timeout", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert HELD in proc.stderr and f"pid {holder.pid}" in proc.stderr
    assert elapsed >= 0.5
    assert elapsed < 5.0


def test_lock_timeout_from_the_environment(start_holder: StartHolder, lock_path: Path) -> None:
    start_holder()
    proc, elapsed = cola(cli_env(lock_path, COLA_LOCK_TIMEOUT="0.7"), "run")
    assert proc.returncode == 0 and HELD in proc.stderr
    assert elapsed >= 0.7


def test_a_child_of_the_holder_does_not_keep_the_lock(start_holder: StartHolder, lock_path: Path) -> None:
    holder = start_holder(spawn_child=True)
    assert holder.child is not None
    holder.kill()
    # The child (`sleep`) is alive and was started with close_fds=False...
    os.kill(holder.child, 0)
    assert Path(f"/proc/{holder.child}").exists()
    # ...yet nobody holds the lock any more.
    held, _ = file_lock.status(str(lock_path))
    assert held is False
    got = file_lock.acquire(str(lock_path))
    assert isinstance(got, file_lock.FileLock)
    got.release()


# --- where the lock file may live ---------------------------------------------


def test_symlink_at_the_lock_path_is_refused(lock_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    before = target.stat()
    link = lock_dir / "run.lock"
    link.symlink_to(target)
    proc, _ = cola(cli_env(link), "run")
    assert proc.returncode == 2
    assert "COLA_LOCK_FILE" in proc.stderr and "symbolic link" in proc.stderr
    assert target.read_text() == "do not touch\n"
    after = target.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_mode,
    )
    assert link.is_symlink()


def test_dangling_symlink_target_is_not_created(lock_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.lock"
    link = lock_dir / "run.lock"
    link.symlink_to(target)
    proc, _ = cola(cli_env(link), "run")
    assert proc.returncode == 2
    assert "symbolic link" in proc.stderr
    assert not target.exists()


def test_lock_file_in_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path = shared / "run.lock"
    proc, _ = cola(cli_env(path), "run")
    assert proc.returncode == 2
    assert "COLA_LOCK_FILE" in proc.stderr and "world-writable" in proc.stderr
    assert not path.exists()


def test_lock_file_in_a_sticky_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "tmp-like"
    shared.mkdir()
    shared.chmod(0o1777)
    proc, _ = cola(cli_env(shared / "run.lock"), "run")
    assert proc.returncode == 2
    assert "COLA_LOCK_FILE" in proc.stderr


def test_lock_file_in_a_group_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o770)
    path = shared / "run.lock"
    for args in (["run"], ["lock", "status"], ["lock", "release"]):
        proc, _ = cola(cli_env(path), *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "COLA_LOCK_FILE" in proc.stderr and "group-writable" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another user")
def test_lock_file_in_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    # Its owner could hold the lock for ever (every run would exit 0 sending
    # nothing) or swap the file: the same hole as a world-writable directory.
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    proc, _ = cola(cli_env(theirs / "run.lock"), "run")
    assert proc.returncode == 2, proc.stderr
    assert "COLA_LOCK_FILE" in proc.stderr and "owned by" in proc.stderr
    assert not (theirs / "run.lock").exists()


def test_hard_linked_lock_path_is_refused_and_its_other_name_untouched(
    lock_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    link = lock_dir / "run.lock"
    os.link(target, link)
    for args in (["run"], ["lock", "status"], ["lock", "release"]):
        proc, _ = cola(cli_env(link), *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "COLA_LOCK_FILE" in proc.stderr and "hard link" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert target.read_text() == "do not touch\n"
        assert link.exists() and target.stat().st_nlink == 2
    with pytest.raises(ConfigError, match="hard link"):
        file_lock.acquire(str(link))
    assert target.read_text() == "do not touch\n"


@pytest.mark.parametrize("args", [["lock", "status"], ["lock", "release"], ["run"], ["status"]])
def test_fifo_at_the_lock_path_never_blocks(lock_dir: Path, args: list[str]) -> None:
    fifo = lock_dir / "run.lock"
    os.mkfifo(fifo, 0o600)
    proc, _ = cola(cli_env(fifo), *args, timeout=20)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "COLA_LOCK_FILE" in proc.stderr and "not a regular file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_acquire_creates_a_private_directory_and_file(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "cola-worker"
    path = directory / "cola-worker.lock"
    got = file_lock.acquire(str(path))
    try:
        assert isinstance(got, file_lock.FileLock)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        if isinstance(got, file_lock.FileLock):
            got.release()


def _home_of_this_user() -> Path:
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _expected_default() -> Path:
    """Under the password database's home of this uid (or the per-uid /tmp
    directory when that home does not exist, as for some CI users)."""
    home = _home_of_this_user()
    if home.is_dir() and home != Path("/"):
        return home / ".local" / "state" / "cola-worker" / "cola-worker.lock"
    return Path(f"/tmp/cola-worker-{os.getuid()}/cola-worker.lock")


def test_default_lock_file_ignores_the_session_environment() -> None:
    expected = _expected_default()
    for environ in (
        {},
        {"HOME": "/somewhere/else"},
        {"HOME": str(_home_of_this_user()), "XDG_RUNTIME_DIR": "/run/user/12345"},
    ):
        assert Path(load_settings(environ=environ).lock_file) == expected, environ


def test_default_lock_file_without_a_home_is_a_per_uid_directory() -> None:
    known = {entry.pw_uid for entry in pwd.getpwall()}
    uid = next(u for u in range(54_321, 99_999) if u not in known)
    assert default_lock_file(uid) == f"/tmp/cola-worker-{uid}/cola-worker.lock"


def _lock_status_path(env: dict[str, str]) -> str:
    proc, _ = cola(env, "lock", "status")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(": ", 1)[0]


def test_cron_and_an_interactive_shell_of_the_same_user_share_the_default_lock(tmp_path: Path) -> None:
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    home = str(_home_of_this_user())
    interactive = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    interactive.update({"HOME": home, "XDG_RUNTIME_DIR": str(runtime)})
    # Debian's cron: a handful of variables; in a container often none at all.
    cron = {"PATH": "/usr/bin:/bin", "HOME": home, "LOGNAME": "x", "SHELL": "/bin/sh"}
    sudo_kept_home = {**cron, "HOME": str(tmp_path / "someone-elses-home")}
    paths = {
        name: _lock_status_path(env)
        for name, env in (
            ("interactive", interactive),
            ("cron", cron),
            ("empty", {}),
            ("sudo", sudo_kept_home),
        )
    }
    assert len(set(paths.values())) == 1, paths
    assert paths["cron"] == str(_expected_default())


# --- lock status / lock release -----------------------------------------------


def test_lock_status_names_the_holder_then_says_free(start_holder: StartHolder, lock_path: Path) -> None:
    env = cli_env(lock_path)
    proc, _ = cola(env, "lock", "status")
    assert proc.returncode == 0 and "free (no lock file)" in proc.stdout
    holder = start_holder()
    proc, _ = cola(env, "lock", "status")
    assert proc.returncode == 0
    assert "held by" in proc.stdout and f"pid {holder.pid}" in proc.stdout
    holder.kill()
    proc, _ = cola(env, "lock", "status")
    assert proc.returncode == 0
    assert "free" in proc.stdout and "held by" not in proc.stdout


def test_lock_status_does_not_take_or_break_the_lock(start_holder: StartHolder, lock_path: Path) -> None:
    holder = start_holder()
    for _ in range(3):
        proc, _ = cola(cli_env(lock_path), "lock", "status")
        assert f"pid {holder.pid}" in proc.stdout
    assert holder.proc.poll() is None
    held, who = file_lock.status(str(lock_path))
    assert held and who is not None and who.pid == holder.pid


def test_lock_release_refuses_while_a_live_process_holds_it(
    start_holder: StartHolder, lock_path: Path
) -> None:
    holder = start_holder()
    proc, _ = cola(cli_env(lock_path), "lock", "release")
    assert proc.returncode == 2
    assert "refused" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    assert lock_path.exists()
    # Still held by the same process: a second run is still refused.
    again, _ = cola(cli_env(lock_path), "run")
    assert again.returncode == 0 and HELD in again.stderr


def test_lock_release_removes_a_lock_nobody_holds(start_holder: StartHolder, lock_path: Path) -> None:
    holder = start_holder()
    holder.kill()
    assert lock_path.exists()
    proc, _ = cola(cli_env(lock_path), "lock", "release")
    assert proc.returncode == 0, proc.stderr
    assert "removed" in proc.stdout
    assert not lock_path.exists()
    proc, _ = cola(cli_env(lock_path), "lock", "release")
    assert proc.returncode == 0 and "no lock file" in proc.stdout


def test_lock_release_refuses_a_symlink(lock_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    link = lock_dir / "run.lock"
    link.symlink_to(target)
    proc, _ = cola(cli_env(link), "lock", "release")
    assert proc.returncode == 2 and "symbolic link" in proc.stderr
    assert link.is_symlink() and target.read_text() == "keep\n"


def test_holder_that_releases_lets_the_next_run_in(start_holder: StartHolder, lock_path: Path) -> None:
    start_holder(hold=0.2)
    assert wait_until(lambda: not file_lock.status(str(lock_path))[0], timeout=10)
    got = file_lock.acquire(str(lock_path))
    assert isinstance(got, file_lock.FileLock)
    try:
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    finally:
        got.release()


class _PausingTime:
    """Stands in for ``worker.lock``'s ``time`` module: the first poll sleep of a
    waiting ``acquire`` blocks until the test says go, so the interleaving is exact."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.go = threading.Event()
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        if not self.go.is_set():
            self.waiting.set()
            self.go.wait(10)
        time.sleep(min(seconds, 0.01))


def test_release_while_a_run_waits_never_gives_two_holders(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = file_lock.acquire(str(lock_path))
    assert isinstance(first, file_lock.FileLock)
    clock = _PausingTime()
    monkeypatch.setattr(file_lock, "time", clock)
    results: list[file_lock.FileLock | file_lock.Holder] = []
    waiter = threading.Thread(target=lambda: results.append(file_lock.acquire(str(lock_path), 2.0)))
    waiter.start()
    held: list[file_lock.FileLock] = []
    try:
        assert clock.waiting.wait(10), "the waiting acquire never polled"
        first.release()  # the first run ends...
        assert file_lock.release_stale(str(lock_path)) is True  # ...an operator clears the "stale" lock...
        second = file_lock.acquire(str(lock_path))  # ...and cron starts the next run.
        assert isinstance(second, file_lock.FileLock)
        held.append(second)
        clock.go.set()
        waiter.join(10)
        assert results, "the waiting acquire did not return"
        if isinstance(results[0], file_lock.FileLock):
            held.append(results[0])
        assert len(held) == 1, "two processes would both believe they hold the lock"
    finally:
        clock.go.set()
        waiter.join(10)
        for got in [*held, *(r for r in results if isinstance(r, file_lock.FileLock) and r not in held)]:
            got.release()
