"""Starting runs on a schedule: ``cola-worker schedule`` and ``cola-worker cron``.

``schedule`` is the container's entrypoint: a small foreground scheduler that
starts ``cola-worker run`` as a child every minute (at once, then on each
minute boundary). The file lock keeps its semantics (the child takes it, so a
manual ``docker compose exec worker cola-worker run`` and the scheduled one
never overlap on that host), and a minute whose previous run is still going
is skipped, as the lock would refuse it anyway. SIGTERM and SIGINT are
forwarded to the running child, which drains (stops claiming, finishes and
records what is in flight, releases the rest); the scheduler then exits with
the child's exit code. Its own log lines and the runs' go to stdout. cron
daemons made for containers do not forward the signal to a running job, so
``docker stop`` could never drain them.

``cron`` wraps one command for a host crontab: the command's output is
appended to ``--log-file`` and printed (so cron mails it) only when the
command fails. A minute whose run finds the lock busy exits 0 and stays
silent; exit codes 1-6 reach the operator's mailbox.

Neither imports SQLAlchemy or httpx: each child is a fresh ``cola-worker``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from worker.errors import UsageError

logger = logging.getLogger(__name__)

SCHEDULE_HELP = "container entrypoint: start `run` every minute, forward SIGTERM so a stop drains"
CRON_HELP = "wrap a command for host cron: output to --log-file, printed only when it fails"


def _child_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def next_boundary(now: float, every: float) -> float:
    """The next multiple of ``every`` seconds after ``now`` (wall clock), like cron's minutes."""
    return (int(now // every) + 1) * every


class Scheduler:
    """Runs in the main thread, where Python also runs the signal handler: the
    handler only records the stop (it may interrupt a ``Popen`` half done), and
    the loop forwards it to the child."""

    def __init__(self, every: float, run_args: Sequence[str]) -> None:
        self.every = every
        self.run_args = list(run_args)
        self.stopping = threading.Event()
        self.stop_signal = signal.SIGTERM
        self.child: subprocess.Popen[bytes] | None = None
        self.last_code = 0

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        """SIGTERM/SIGINT: schedule nothing more; the loop tells the running child to drain."""
        self.stop_signal = signal.Signals(signum)
        self.stopping.set()

    def _reap(self) -> bool:
        """True when no child is running (collecting the exit code of one that ended)."""
        child = self.child
        if child is None:
            return True
        code = child.poll()
        if code is None:
            return False
        self.last_code = code
        log = logger.info if code == 0 else logger.error
        log(
            "schedule: run pid %s exited %s", child.pid, code, extra={"action": "schedule_exit", "code": code}
        )
        self.child = None
        return True

    def _start(self) -> None:
        # The run's log lines (stderr) join the scheduler's on stdout: one
        # stream for `docker logs` and log collectors.
        self.child = subprocess.Popen(_child_command(["run", *self.run_args]), stderr=subprocess.STDOUT)
        logger.info("schedule: started run pid %s", self.child.pid, extra={"action": "schedule_start"})

    def loop(self) -> int:
        due = time.time()  # the first run starts at once
        while not self.stopping.is_set():
            now = time.time()
            if now >= due:
                if self._reap():
                    self._start()
                else:
                    logger.info(
                        "schedule: the previous run is still going; skipping this minute",
                        extra={"action": "schedule_skip"},
                    )
                due = next_boundary(now, self.every)
            else:
                self._reap()
            self.stopping.wait(min(1.0, max(0.01, due - time.time())))
        name = signal.Signals(self.stop_signal).name
        child = self.child
        if child is None or child.poll() is not None:
            logger.info("schedule: %s received, no run in progress", name)
            self._reap()
            return 0
        logger.info(
            "schedule: %s received, forwarded to run pid %s as SIGTERM (it drains, then exits)",
            name,
            child.pid,
            extra={"action": "schedule_stop"},
        )
        # Always SIGTERM: a run that is still starting (no handler yet, so
        # nothing claimed) just ends, where SIGINT would raise in its imports.
        child.send_signal(signal.SIGTERM)
        code = child.wait()
        self._reap()
        if code == -signal.SIGTERM:
            # Killed by the forwarded signal before its handler was in place,
            # that is before it claimed anything: a clean stop.
            logger.info("schedule: the run stopped before it claimed anything")
            return 0
        return code


def command_schedule(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cola-worker schedule",
        description=SCHEDULE_HELP + ". Arguments after the options are passed to `run`.",
    )
    parser.add_argument(
        "--every", type=float, default=60.0, help="seconds between runs (default 60: every minute)"
    )
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="arguments for `cola-worker run`")
    args = parser.parse_args(list(argv))
    if not args.every > 0:
        raise UsageError("--every: must be a number of seconds above 0")
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    _configure_logging()
    scheduler = Scheduler(args.every, run_args)
    signal.signal(signal.SIGTERM, scheduler.forward)
    signal.signal(signal.SIGINT, scheduler.forward)
    logger.info(
        "schedule: a run every %gs (pid %s); SIGTERM drains the running one",
        args.every,
        os.getpid(),
        extra={"action": "schedule_begin"},
    )
    return scheduler.loop()


def command_cron(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cola-worker cron",
        description=CRON_HELP + ". Example: cola-worker cron --log-file /var/log/cola-worker/run.log run",
    )
    parser.add_argument("--log-file", help="append every run's output here (default: discard it on success)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the cola-worker command and its arguments")
    args = parser.parse_args(list(argv))
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("cron: name the command to run, e.g. `cola-worker cron --log-file F run`")
    started = dt.datetime.now(dt.UTC)
    proc = subprocess.run(_child_command(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.decode("utf-8", "replace")
    if args.log_file:
        try:
            with open(args.log_file, "a", encoding="utf-8") as log:
                log.write(output)
        except OSError as exc:
            sys.stdout.write(output)
            raise UsageError(f"--log-file: cannot append to {args.log_file}: {exc.strerror}") from exc
    if proc.returncode != 0:
        sys.stdout.write(output)
        sys.stdout.write(
            f"cola-worker cron: `cola-worker {' '.join(command)}` started {started:%Y-%m-%dT%H:%M:%SZ} "
            f"exited {proc.returncode}\n"
        )
    return proc.returncode


def _configure_logging() -> None:
    from worker.settings import load_settings

    try:
        settings = load_settings({})
        log_format, level = settings.log_format, settings.log_level
    except UsageError:
        log_format, level = "text", "INFO"  # the child will report the configuration error
    from worker.logs import configure

    configure(log_format, level, stream=sys.stdout)
