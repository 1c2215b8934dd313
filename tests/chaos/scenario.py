"""The chaos scenario (Jepsen style): many runs, random SIGKILLs, a database
killed and restarted, a provider that fails in every way a real one does;
then a drain, and the checker compares the provider's ledger with the table.

Topology (all on 127.0.0.1, every process started here and killed by its pid):

- ``hosts`` slots of ``cola-worker run --max-jobs 0``, each with a lock file of
  its own (separate hosts: only SKIP LOCKED and the claim tokens keep them
  apart); a slot whose run ended or was killed starts a new run shortly after;
- cron-style runs sharing one lock file, one started every ``cron_every``
  seconds: most exit 0 at once because the lock is busy;
- every ``kill_every`` seconds, a SIGKILL to one run chosen at random among
  those whose log said ``started`` at least ``min_work`` seconds ago (a tick
  that finds none kills none): killing Python during its imports tests
  nothing, and on a 2-core machine the restarts alone would eat the CPU;
- the database server (private, see tests/support.py) SIGKILLed when the
  queue is ``db_kill_at`` done (or that share of ``chaos_seconds`` has
  passed), and restarted ``db_down_seconds`` later;
- the sandbox (``cola-worker fake-provider``, a process of its own) with fault
  rates: fail-before (500 with a temporary-error body, not accepted),
  fail-after (500 without one, accepted), stall-after (accepted, answered
  after the client's read timeout), reset-after (accepted, connection reset),
  throttle (429). Its ledger file is the truth of what was accepted.

The chaos phase ends when every row is final or after ``chaos_seconds``;
every run still alive is killed. Then, once the leases ran out, rounds of
runs (several at once, ``--max-jobs`` capped, no kills; the sandbox keeps its
fault rates) drain the queue until every row is final or four rounds make no
progress; leftovers in ``procesando``/``enviando`` are settled by a last
``recover`` after the lease.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from checker import FINAL, Report, check, read_ledger, read_rows
from support import PROJECT, free_port, run_worker, seed, start_worker, worker_env

from worker import db

DRAIN_MAX_JOBS = 300


class KillableServer(Protocol):
    def kill(self) -> None: ...
    def start(self) -> None: ...


@dataclass(frozen=True)
class ChaosPlan:
    messages: int
    hosts: int = 4
    concurrency: int = 8
    batch_size: int = 20
    chaos_seconds: float = 60.0  # longest kill phase (it ends sooner when every row is final)
    kill_every: tuple[float, float] = (0.1, 0.4)  # a tick kills one run that has worked min_work
    min_work: float = 0.5
    cron_every: tuple[float, float] = (0.5, 1.0)
    restart_after: tuple[float, float] = (0.0, 0.5)  # a host slot starts its next run
    db_kill_at: tuple[float, ...] = (0.3,)  # share of rows final (or of chaos_seconds) at each kill
    db_down_seconds: float = 1.5
    lease_seconds: float = 3.0
    read_timeout: float = 1.0
    stall_seconds: float = 3.0
    latency_ms: float = 20.0
    jitter_ms: float = 15.0
    fail_before: float = 0.03
    fail_after: float = 0.01
    stall_after: float = 0.01
    reset_after: float = 0.01
    throttle: float = 0.005
    max_attempts: int = 10
    drain_seconds: float = 180.0
    seed: int = 0


@dataclass
class ChaosResult:
    plan: ChaosPlan
    backend: str
    report: Report
    run_exits: dict[str, int] = field(default_factory=dict)
    runs_started: int = 0
    kills: int = 0
    db_kills: int = 0
    final_at_db_kills: list[int] = field(default_factory=list)
    final_after_chaos: int = 0
    drain_runs: int = 0
    chaos_seconds: float = 0.0
    drain_seconds: float = 0.0
    sandbox: dict[str, Any] = field(default_factory=dict)
    workdir: str = ""

    def summary(self) -> str:
        exits = ", ".join(f"{k}: {v}" for k, v in sorted(self.run_exits.items()))
        return (
            f"{self.backend}, seed {self.plan.seed}: {self.plan.messages} messages, "
            f"{self.runs_started} runs started ({exits}), {self.kills} SIGKILLs, "
            f"{self.db_kills} database kills (at {self.final_at_db_kills} rows final), "
            f"{self.final_after_chaos} rows final after {self.chaos_seconds:.0f} s of chaos, "
            f"drain {self.drain_runs} runs in {self.drain_seconds:.0f} s; "
            f"sandbox {self.sandbox.get('requests')} requests, outcomes {self.sandbox.get('outcomes')}"
        )

    def as_json(self) -> dict[str, Any]:
        plan = asdict(self.plan)
        return {
            "backend": self.backend,
            "plan": plan,
            "checker": self.report.as_json(),
            "summary": self.summary(),
            "runs_started": self.runs_started,
            "run_exits": self.run_exits,
            "kills": self.kills,
            "db_kills": self.db_kills,
            "final_at_db_kills": self.final_at_db_kills,
            "final_after_chaos": self.final_after_chaos,
            "drain_runs": self.drain_runs,
            "chaos_seconds": round(self.chaos_seconds, 1),
            "drain_seconds": round(self.drain_seconds, 1),
            "sandbox": self.sandbox,
        }


def _exit_label(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


class _Sandbox:
    """``cola-worker fake-provider`` in a process (and process group) of its own."""

    def __init__(self, plan: ChaosPlan, workdir: Path) -> None:
        self.port = free_port()
        self.ledger = workdir / "ledger.jsonl"
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "worker",
            "fake-provider",
            "--port",
            str(self.port),
            "--ledger",
            str(self.ledger),
            "--seed",
            str(plan.seed),
            "--latency-ms",
            str(plan.latency_ms),
            "--jitter-ms",
            str(plan.jitter_ms),
            "--stall-seconds",
            str(plan.stall_seconds),
            "--fail-before",
            str(plan.fail_before),
            "--fail-after",
            str(plan.fail_after),
            "--stall-after",
            str(plan.stall_after),
            "--reset-after",
            str(plan.reset_after),
            "--throttle",
            str(plan.throttle),
        ]
        with open(workdir / "sandbox.log", "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.admin("health")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.1)

    def admin(self, what: str) -> Any:
        with urllib.request.urlopen(f"{self.base_url}/_sandbox/{what}", timeout=10) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)


class ChaosRun:
    def __init__(
        self, url: str, backend: str, server: KillableServer | None, workdir: Path, plan: ChaosPlan
    ) -> None:
        self.url = url
        self.backend = backend
        self.server = server
        self.workdir = workdir
        self.plan = plan
        self.rng = random.Random(plan.seed)
        (workdir / "logs").mkdir(exist_ok=True)
        self.procs: list[tuple[subprocess.Popen[str], str, Path]] = []  # live runs: kind, log
        self._working: dict[int, float] = {}  # pid -> when its log first said it had started
        self.exits: Counter[str] = Counter()
        self.result = ChaosResult(plan=plan, backend=backend, report=Report(), workdir=str(workdir))
        self._engine = sa.create_engine(db.parse_url(url), poolclass=sa.pool.NullPool)
        self._outage: threading.Thread | None = None
        self._outage_error: BaseException | None = None

    # --- helpers ----------------------------------------------------------------

    def env(self, lock: str) -> dict[str, str]:
        p = self.plan
        return worker_env(
            self.url,
            self.workdir,
            provider="fake",
            fake_base_url=self.sandbox.base_url,
            lock_file=self.workdir / "locks" / lock,
            lease_seconds=p.lease_seconds,
            read_timeout=p.read_timeout,
            connect_timeout=2,
            concurrency=p.concurrency,
            batch_size=p.batch_size,
            backoff_base=0.2,
            backoff_max=1,
            rate_limit=5000,
            pair_interval=0,
        )

    def start_run(self, kind: str, lock: str, *args: str) -> subprocess.Popen[str]:
        log = self.workdir / "logs" / f"{self.result.runs_started:05d}-{kind}.log"
        proc = start_worker(self.env(lock), "run", *args, log=log)
        self.procs.append((proc, kind, log))
        self.result.runs_started += 1
        return proc

    def reap(self) -> None:
        still = []
        for proc, kind, log in self.procs:
            code = proc.poll()
            if code is None:
                still.append((proc, kind, log))
            else:
                self._working.pop(proc.pid, None)
                self.exits[f"{kind} {_exit_label(code)}"] += 1
        self.procs = still

    def working(self, now: float) -> list[subprocess.Popen[str]]:
        """Live runs that got past their start-up (imports, lock, registration:
        their log says so) at least ``min_work`` seconds ago. Only they are
        killed: a kill during the imports tests nothing, and on a loaded
        2-core machine the start-ups alone would take all the CPU."""
        found = []
        for proc, _, log in self.procs:
            if proc.poll() is not None:
                continue
            if proc.pid not in self._working:
                try:
                    if b" started: pid " not in log.read_bytes()[:4096]:
                        continue
                except OSError:
                    continue
                self._working[proc.pid] = now
            if now - self._working[proc.pid] >= self.plan.min_work:
                found.append(proc)
        return found

    def kill(self, proc: subprocess.Popen[str]) -> bool:
        if proc.poll() is not None:
            return False
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a run this test started, by its pid (= its group)
        except ProcessLookupError:
            return False
        return True

    def states(self) -> Counter[str] | None:
        """Rows by state, or None while the database is down."""
        try:
            with self._engine.connect() as conn:
                result = conn.execute(sa.text("SELECT estado, COUNT(*) FROM cola_envios GROUP BY estado"))
                return Counter({str(r[0]): int(r[1]) for r in result})
        except sa.exc.DBAPIError:
            return None

    @staticmethod
    def final(states: Counter[str]) -> int:
        return sum(n for s, n in states.items() if s in FINAL)

    def _outage_thread(self) -> None:
        assert self.server is not None
        try:
            self.server.kill()
            time.sleep(self.plan.db_down_seconds)
            self.server.start()
        except BaseException as exc:  # reported by the main thread
            self._outage_error = exc

    # --- the scenario -----------------------------------------------------------

    def run(self) -> ChaosResult:
        p = self.plan
        engine = db.create_engine(self.url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        seed(self.url, p.messages, session="chaos", max_attempts=p.max_attempts)
        self.sandbox = _Sandbox(p, self.workdir)
        try:
            self._chaos()
            self._drain()
            self.result.sandbox = self.sandbox.admin("stats")
            self.result.sandbox.pop("faults", None)
        finally:
            for proc, _, _ in self.procs:
                self.kill(proc)
            for proc, _, _ in self.procs:
                proc.wait(timeout=30)
            self.reap()
            self.sandbox.stop()
            self._engine.dispose()
        self.result.run_exits = dict(self.exits)
        self.result.report = check(read_ledger(self.sandbox.ledger), read_rows(self.url))
        return self.result

    def _chaos(self) -> None:
        p = self.plan
        rng = self.rng
        t0 = time.monotonic()
        hosts: list[subprocess.Popen[str] | None] = [None] * p.hosts
        host_due = [t0 + rng.uniform(0, 0.3) for _ in range(p.hosts)]
        next_kill = t0 + rng.uniform(*p.kill_every)
        next_cron = t0 + rng.uniform(*p.cron_every)
        next_check = t0 + 1.0
        kills_left = list(p.db_kill_at) if self.server is not None else []
        final = 0
        while True:
            now = time.monotonic()
            elapsed = now - t0
            self.reap()
            for k, proc in enumerate(hosts):
                if proc is not None and proc.poll() is not None:
                    hosts[k] = None
                    host_due[k] = now + rng.uniform(*p.restart_after)
                if hosts[k] is None and now >= host_due[k]:
                    hosts[k] = self.start_run("host", f"host{k}.lock", "--max-jobs", "0")
            if now >= next_cron:
                max_jobs = rng.choice(("0", "50", "200"))
                self.start_run("cron", "cron.lock", "--max-jobs", max_jobs)
                next_cron = now + rng.uniform(*p.cron_every)
            if now >= next_kill:
                working = self.working(now)
                if working and self.kill(rng.choice(working)):
                    self.result.kills += 1
                next_kill = now + rng.uniform(*p.kill_every)
            if now >= next_check:
                next_check = now + 1.0
                counted = self.states()
                if counted is not None:
                    final = self.final(counted)
            outage_running = self._outage is not None and self._outage.is_alive()
            if self._outage_error is not None:
                raise RuntimeError("the database did not come back") from self._outage_error
            if kills_left and not outage_running:
                share = kills_left[0]
                if final >= share * p.messages or elapsed >= share * p.chaos_seconds:
                    kills_left.pop(0)
                    self.result.db_kills += 1
                    self.result.final_at_db_kills.append(final)
                    self._outage = threading.Thread(target=self._outage_thread, name="db-outage")
                    self._outage.start()
                    outage_running = True
            done = final >= p.messages or elapsed >= p.chaos_seconds
            if done and not kills_left and not outage_running:
                break
            time.sleep(0.02)
        self.result.chaos_seconds = time.monotonic() - t0
        for proc, _, _ in self.procs:
            self.kill(proc)
        for proc, _, _ in self.procs:
            proc.wait(timeout=30)
        self.reap()
        counted = self.states()
        assert counted is not None, "the database is down after the chaos phase"
        self.result.final_after_chaos = self.final(counted)

    def _drain(self) -> None:
        p = self.plan
        t0 = time.monotonic()
        time.sleep(p.lease_seconds + 0.5)  # the killed runs' leases run out
        stale_rounds = 0
        counted = self.states()
        assert counted is not None
        left = p.messages - self.final(counted)
        while left and stale_rounds < 4 and time.monotonic() - t0 < p.drain_seconds:
            # Several runs at once, each capped: a run's rate halves at each 429 and only
            # climbs back after 30 s, so one long run would crawl through the last rows.
            n = min(p.hosts, -(-left // DRAIN_MAX_JOBS))
            procs = [
                self.start_run("drain", f"drain{k}.lock", "--max-jobs", str(DRAIN_MAX_JOBS)) for k in range(n)
            ]
            for proc in procs:
                proc.wait(timeout=p.drain_seconds)
            self.reap()
            self.result.drain_runs += n
            counted = self.states()
            assert counted is not None
            now_left = p.messages - self.final(counted)
            stale_rounds = stale_rounds + 1 if now_left >= left else 0
            left = now_left
            if left:
                time.sleep(1.0)  # backoffs (at most backoff_max) and throttle pauses run out
        counted = self.states()
        assert counted is not None
        if counted["procesando"] or counted["enviando"]:
            time.sleep(p.lease_seconds + 0.5)
            rec = run_worker(self.env("drain.lock"), "recover", timeout=60)
            self.exits[f"recover {_exit_label(rec.returncode)}"] += 1
        self.result.drain_seconds = time.monotonic() - t0
