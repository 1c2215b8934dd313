"""The crash-point matrix (G2 at most once, G3 nothing lost).

A real `cola-worker run` is killed with SIGKILL (the test-only hook of
worker/faults.py, `COLA_TEST_CRASH_AT=POINT:N`) at each point of a message's
life, many times per point:

=============  ==============================================  ===========================
point          the row at the crash is                          after recovery it must be
=============  ==============================================  ===========================
after-claim    ``procesando``, nothing sent                     ``pendiente``
after-fence    ``enviando``, request not started (not sent)     ``incierto`` (recovery never
                                                                returns enviando to pendiente)
after-request  ``enviando``, request written, answer not read   ``incierto`` (accepted once)
after-answer   ``enviando``, answer read and spooled, not       ``incierto`` after recovery (accepted
               recorded                                         once), ``enviado`` after the next run
                                                                on that host replays the spool
after-record   ``enviado``                                      ``enviado`` (accepted once)
=============  ==============================================  ===========================

Each kill is one small run (3-5 rows of a session of its own), a few at a time
on separate lock files. Half of them run one message at a time, so the state
of every row is predicted exactly; the other half run three at a time (fence
and record in groups), where the row named by the hook is predicted exactly
and the other rows in flight must be in a state the contract allows for what
the sandbox's ledger (the truth of what was accepted) says. After all kills:
wait past the lease on the database's clock, `cola-worker recover`, check;
then one clean run per lock file (it replays that host's outcome spool, if
any, and sends what went back to ``pendiente``) and check again: every job
accepted at most once, every row final, ``enviado`` exactly for the rows
recorded as accepted with the ledger's message id.

Environment: ``COLA_CRASH_ITERATIONS`` kills per point and backend (default
50 on SQLite and MariaDB/MySQL, 10 on PostgreSQL, to stay in CI's time
budget; ``make crash-matrix`` runs 200 on each), ``COLA_CRASH_PARALLEL``
runs at a time (default 3), ``COLA_CRASH_SEED`` to replay a plan (printed
with the table), ``COLA_CRASH_BACKENDS`` (default ``sqlite,mysql,postgresql``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import queue
import random
import re
import resource
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import fresh_database
from support import PROJECT, cola_cmd, rows, run_worker, worker_env

from worker import db
from worker.faults import AFTER_ANSWER, AFTER_CLAIM, AFTER_FENCE, AFTER_RECORD, AFTER_REQUEST, POINTS
from worker.queue import RUN_ACTIVE
from worker.sandbox import SandboxOptions, SandboxServer
from worker.schema import cola_envios, ejecuciones, envios_whatsapp, sesiones_envio

# Kills per point. CI's budget (a few minutes for the matrix) holds 50 per point on
# SQLite and MariaDB; PostgreSQL gets a smaller share unless COLA_CRASH_ITERATIONS says.
DEFAULT_ITERATIONS = {"sqlite": 50, "mysql": 50, "postgresql": 10}
_ITERATIONS_ENV = os.environ.get("COLA_CRASH_ITERATIONS")
PARALLEL = int(os.environ.get("COLA_CRASH_PARALLEL") or 3)
SEED = int(os.environ.get("COLA_CRASH_SEED") or random.randrange(2**31))
BACKENDS = tuple((os.environ.get("COLA_CRASH_BACKENDS") or "sqlite,mysql,postgresql").split(","))


def iterations(backend: str) -> int:
    return int(_ITERATIONS_ENV) if _ITERATIONS_ENV else DEFAULT_ITERATIONS[backend]


# Short, so that the final recovery waits little; long enough that a loaded
# machine cannot starve a live run's heartbeat (every lease/4) past it, which
# would let another run's start-up recovery take its rows.
LEASE = 5.0
CONCURRENT = 3  # messages in flight in the "concurrent" runs
CRASH_LINE = re.compile(
    r"test crash point (?P<point>[a-z-]+) reached \(time \d+(?:, job (?P<job>\d+))?\): SIGKILL"
)

# What the row named by the hook must end as after recovery: states, times accepted.
AT_CRASH: dict[str, tuple[frozenset[str], int]] = {
    AFTER_FENCE: (frozenset({"incierto"}), 0),
    AFTER_REQUEST: (frozenset({"incierto"}), 1),
    AFTER_ANSWER: (frozenset({"enviado", "incierto"}), 1),
    AFTER_RECORD: (frozenset({"enviado"}), 1),
}
# Any row of a killed run, after recovery, given how often the sandbox accepted it.
ALLOWED = {0: frozenset({"pendiente", "incierto"}), 1: frozenset({"enviado", "incierto"})}


@dataclass
class Plan:
    """One killed run: ``rows`` messages of session ``session``, killed the
    ``n``-th time it reaches ``point``."""

    index: int
    point: str
    sequential: bool
    rows: int
    n: int
    ids: list[int] = field(default_factory=list)
    slot: int = -1
    returncode: int | None = None
    stderr: str = ""
    crashed_at: str | None = None  # the point the hook named
    crash_job: int | None = None
    seconds: float = 0.0

    @property
    def session(self) -> str:
        return f"crash-{self.index:05d}"

    @property
    def concurrency(self) -> int:
        return 1 if self.sequential else CONCURRENT

    @property
    def batch_size(self) -> int:
        # Sequential: one claim takes every row, so rows go out strictly in id order.
        return self.rows if self.sequential else 2

    def describe(self) -> str:
        mode = "sequential" if self.sequential else f"concurrency {CONCURRENT}"
        return f"run {self.index} ({self.point}:{self.n}, {mode}, {self.rows} rows {self.ids})"

    def expected(self, position: int) -> tuple[frozenset[str], int] | None:
        """Sequential runs only: the exact (states, times accepted) of the row
        at ``position`` (1-based, in id order) after recovery."""
        if not self.sequential:
            return None
        pendiente = (frozenset({"pendiente"}), 0)
        if self.point == AFTER_CLAIM:
            return pendiente
        enviado = (frozenset({"enviado"}), 1)
        if position < self.n:
            return enviado
        if position > self.n:
            return pendiente
        return AT_CRASH[self.point]


def make_plans(rng: random.Random, iterations: int) -> list[Plan]:
    plans: list[Plan] = []
    for i in range(iterations):
        for point in POINTS:
            sequential = i % 2 == 0
            n_rows = rng.randint(3, 5)
            # Every message passes each point but after-claim once. A sequential
            # run claims every row at once (its next claim, empty, races with the
            # last message: not predictable); a concurrent one two at a time.
            claims = 1 if sequential else math.ceil(n_rows / 2)
            reach = claims if point == AFTER_CLAIM else n_rows
            plans.append(Plan(len(plans), point, sequential, n_rows, rng.randint(1, reach)))
    rng.shuffle(plans)
    return plans


def insert_rows(url: str, plans: list[Plan]) -> None:
    """One session per plan, its rows to numbers of their own, in one transaction."""
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            now = db.db_now(conn)
            due = now - dt.timedelta(seconds=1)
            for plan in plans:
                sid = conn.execute(
                    sesiones_envio.insert().values(nombre=plan.session, estado="activa", creado_at=now)
                ).inserted_primary_key[0]
                conn.execute(
                    cola_envios.insert(),
                    [
                        {
                            "sesion_id": sid,
                            "cliente_id": f"c{plan.index}-{k}",
                            "telefono": f"+519{plan.index:05d}{k:03d}",
                            "tipo": "text",
                            "payload": json.dumps({"text": f"hola {plan.index}-{k}"}),
                            "estado": "pendiente",
                            "intentos": 0,
                            "max_intentos": 3,
                            "proximo_intento_at": due,
                            "clave": f"{plan.session}-{k}",
                            "creado_at": now,
                            "actualizado_at": now,
                        }
                        for k in range(plan.rows)
                    ],
                )
            by_session: dict[str, list[int]] = {}
            for r in conn.execute(
                sa.select(cola_envios.c.id, sesiones_envio.c.nombre)
                .join(sesiones_envio, sesiones_envio.c.id == cola_envios.c.sesion_id)
                .order_by(cola_envios.c.id)
            ):
                by_session.setdefault(r.nombre, []).append(int(r.id))
        for plan in plans:
            plan.ids = by_session[plan.session]
    finally:
        engine.dispose()


def crash_run(plan: Plan, env: dict[str, str], slots: queue.SimpleQueue[int], tmp: Path) -> None:
    slot = slots.get()
    try:
        plan.slot = slot
        run_env = dict(env)
        run_env.update(
            {
                "COLA_LOCK_FILE": str(slot_dir(tmp, slot) / "run.lock"),
                "COLA_CONCURRENCY": str(plan.concurrency),
                "COLA_BATCH_SIZE": str(plan.batch_size),
                "COLA_TEST_CRASH_AT": f"{plan.point}:{plan.n}",
            }
        )
        t0 = time.monotonic()
        proc = subprocess.run(
            cola_cmd("run", "--session", plan.session),
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=PROJECT,
        )
        plan.seconds = time.monotonic() - t0
    finally:
        slots.put(slot)
    plan.returncode = proc.returncode
    plan.stderr = proc.stderr
    m = CRASH_LINE.search(proc.stderr)
    plan.crashed_at = m["point"] if m else None
    if m and m["job"]:
        plan.crash_job = int(m["job"])


def slot_dir(tmp: Path, slot: int) -> Path:
    """One directory per lock file: a host's outcome spool lives next to it."""
    d = tmp / f"host-{slot}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def wait_past_lease(url: str, lease: float, timeout: float = 120) -> None:
    """Until every live-looking run's last heartbeat is older than the lease, on the database's clock."""
    engine = db.create_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                now = db.db_now(conn)
                last = conn.execute(
                    sa.select(sa.func.max(ejecuciones.c.latido_at)).where(ejecuciones.c.estado == RUN_ACTIVE)
                ).scalar()
            if last is None or (now - last).total_seconds() > lease + 0.1:
                return
            time.sleep(0.2)
        raise AssertionError(f"runs still heartbeating after {timeout}s")
    finally:
        engine.dispose()


def sent_ids(url: str) -> dict[int, str | None]:
    """envios_whatsapp: job -> provider message id."""
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            w = envios_whatsapp.c
            return {int(r[0]): r[1] for r in conn.execute(sa.select(w.cola_envio_id, w.proveedor_msg_id))}
    finally:
        engine.dispose()


@dataclass
class Check:
    """Violations and a per-point tally of final states."""

    violations: list[str] = field(default_factory=list)
    states: dict[str, Counter[str]] = field(default_factory=dict)

    def fail(self, plan: Plan | None, text: str) -> None:
        self.violations.append(f"{plan.describe() + ': ' if plan else ''}{text}")


def check_rows(
    plans: list[Plan],
    table: dict[int, dict[str, Any]],
    ledger: list[dict[str, Any]],
    sent: dict[int, str | None],
) -> Check:
    """The rules every row must meet, whatever the phase: at most one
    acceptance per job; ``enviado`` only with the ledger's message id and one
    ``envios_whatsapp`` row; a state the contract allows for what was accepted."""
    check = Check()
    accepted = Counter(int(e["job_id"]) for e in ledger)
    message_id = {int(e["job_id"]): str(e["message_id"]) for e in ledger}
    known = {i for p in plans for i in p.ids}
    for job in sorted(set(accepted) - known):
        check.fail(None, f"job {job} accepted but unknown")
    for plan in plans:
        tally = check.states.setdefault(plan.point, Counter())
        for row_id in plan.ids:
            estado = table[row_id]["estado"]
            times = accepted[row_id]
            tally[estado] += 1
            if times > 1:
                check.fail(plan, f"row {row_id} accepted {times} times")
                continue
            if estado not in ALLOWED[times]:
                check.fail(plan, f"row {row_id} is {estado} but was accepted {times} time(s)")
            if estado == "enviado":
                if table[row_id]["proveedor_msg_id"] != message_id.get(row_id):
                    check.fail(plan, f"row {row_id} enviado with a message id not in the ledger")
                if sent.get(row_id) != message_id.get(row_id):
                    check.fail(plan, f"row {row_id} enviado without its envios_whatsapp row")
            elif row_id in sent:
                check.fail(plan, f"row {row_id} is {estado} but has an envios_whatsapp row")
    return check


def check_after_recovery(
    plans: list[Plan],
    table: dict[int, dict[str, Any]],
    ledger: list[dict[str, Any]],
    sent: dict[int, str | None],
) -> Check:
    check = check_rows(plans, table, ledger, sent)
    accepted = Counter(int(e["job_id"]) for e in ledger)
    for plan in plans:
        if plan.returncode != -9 or plan.crashed_at != plan.point:
            tail = " | ".join(plan.stderr.strip().splitlines()[-3:])
            check.fail(plan, f"was not killed by the hook (exit {plan.returncode}): {tail}")
            continue
        if plan.point != AFTER_CLAIM and plan.crash_job not in plan.ids:
            check.fail(plan, f"the hook named job {plan.crash_job}, not one of this run's rows")
            continue
        got = [(table[i]["estado"], accepted[i]) for i in plan.ids]
        if plan.sequential:
            if plan.point != AFTER_CLAIM and plan.crash_job != plan.ids[plan.n - 1]:
                check.fail(plan, f"killed at job {plan.crash_job}, not at the {plan.n}-th row")
            for position, (row_id, (estado, times)) in enumerate(zip(plan.ids, got, strict=True), 1):
                exp = plan.expected(position)
                assert exp is not None
                if estado not in exp[0] or times != exp[1]:
                    check.fail(
                        plan,
                        f"row {row_id} (position {position}) is {estado}, accepted {times}; "
                        f"expected {'/'.join(sorted(exp[0]))}, accepted {exp[1]}",
                    )
            continue
        if plan.crash_job is not None:
            states, times = AT_CRASH[plan.point]
            estado, got_times = table[plan.crash_job]["estado"], accepted[plan.crash_job]
            if estado not in states or got_times != times:
                check.fail(
                    plan,
                    f"row {plan.crash_job} named by the hook is {estado}, accepted {got_times}; "
                    f"expected {'/'.join(sorted(states))}, accepted {times}",
                )
        # Only rows in flight can be incierto: at most one per thread.
        uncertain = sum(1 for estado, _ in got if estado == "incierto")
        if uncertain > plan.concurrency:
            check.fail(plan, f"{uncertain} rows incierto with {plan.concurrency} in flight at most")
    return check


def check_after_drain(
    plans: list[Plan],
    recovered: dict[int, dict[str, Any]],
    table: dict[int, dict[str, Any]],
    ledger: list[dict[str, Any]],
    sent: dict[int, str | None],
) -> Check:
    check = check_rows(plans, table, ledger, sent)
    for plan in plans:
        for row_id in plan.ids:
            before, after = recovered[row_id]["estado"], table[row_id]["estado"]
            if after not in ("enviado", "incierto"):
                check.fail(plan, f"row {row_id} is {after} after the final run (lost)")
            elif before == "pendiente" and after != "enviado":
                check.fail(plan, f"row {row_id} went back to pendiente and then ended {after}, not enviado")
            elif before == "enviado" and after != "enviado":
                check.fail(plan, f"row {row_id} was enviado and is now {after}")
        # Its answer was in the outcome spool: the next run on that host settles it.
        if (
            plan.point == AFTER_ANSWER
            and plan.crash_job is not None
            and table[plan.crash_job]["estado"] != "enviado"
        ):
            check.fail(
                plan,
                f"row {plan.crash_job} was killed after its answer was spooled and is "
                f"{table[plan.crash_job]['estado']} after the spool's replay, not enviado",
            )
    return check


def table_of(
    backend: str, plans: list[Plan], after_recovery: Check, final: Check, seconds: float, cpu: float
) -> str:
    runs = sorted(p.seconds for p in plans)
    lines = [
        f"crash-point matrix on {backend}: seed {SEED}, {len(plans) // len(POINTS)} kills per point, "
        f"{PARALLEL} at a time: "
        f"{seconds:.0f}s in all; a killed run {runs[len(runs) // 2]:.2f}s median, {runs[-1]:.2f}s max, "
        f"{cpu / len(plans):.2f} CPU-s each",
        f"{'point':<14}{'kills':>6}{'rows':>6}  after recovery (state: rows)",
    ]
    for point in POINTS:
        mine = [p for p in plans if p.point == point]
        killed = sum(1 for p in mine if p.returncode == -9)
        n_rows = sum(p.rows for p in mine)
        states = ", ".join(f"{k} {v}" for k, v in sorted(after_recovery.states.get(point, Counter()).items()))
        lines.append(f"{point:<14}{killed:>6}{n_rows:>6}  {states}")
    lines.append(
        f"violations: {len(after_recovery.violations)} after recovery, {len(final.violations)} at the end"
    )
    return "\n".join(lines)


def count(url: str, stmt: Any) -> int:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())
    finally:
        engine.dispose()


@pytest.fixture
def matrix_db(backend: str, tmp_path: Path) -> Iterator[str]:
    fresh = fresh_database(backend, tmp_path)
    try:
        engine = db.create_engine(fresh.url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        yield fresh.url
    finally:
        fresh.drop()


@pytest.mark.slow
@pytest.mark.timeout(600 + max(map(iterations, BACKENDS)) * len(POINTS) * 6)  # a guard against hangs only
@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_point_matrix(backend: str, matrix_db: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    cpu0 = children_cpu()
    plans = make_plans(random.Random(SEED), iterations(backend))
    insert_rows(matrix_db, plans)
    with SandboxServer(SandboxOptions(port=0)) as sandbox:
        env = worker_env(
            matrix_db,
            tmp_path,
            provider="fake",
            fake_base_url=sandbox.base_url,
            lease_seconds=LEASE,
            max_jobs=0,
            log_level="WARNING",
        )
        slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(PARALLEL):
            slots.put(slot)
        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            for fut in [pool.submit(crash_run, plan, env, slots, tmp_path) for plan in plans]:
                fut.result()
        cpu = children_cpu() - cpu0

        # Recovery, once past the lease of the last run killed on the database's clock.
        wait_past_lease(matrix_db, LEASE)
        recover = run_worker(env, "recover")
        assert recover.returncode == 0, recover.stderr
        c = cola_envios.c
        in_flight = sa.select(sa.func.count()).where(c.estado.in_(["procesando", "enviando"]))
        assert count(matrix_db, in_flight) == 0
        live = sa.select(sa.func.count()).where(ejecuciones.c.estado == RUN_ACTIVE)
        assert count(matrix_db, live) == 0
        recovered = rows(matrix_db)
        after_recovery = check_after_recovery(plans, recovered, sandbox.ledger(), sent_ids(matrix_db))

        # The next run on each "host" replays its outcome spool and sends what went back to pendiente.
        for slot in range(PARALLEL):
            drain_env = dict(env, COLA_LOCK_FILE=str(slot_dir(tmp_path, slot) / "run.lock"))
            drain_env["COLA_CONCURRENCY"] = "8"
            done = run_worker(drain_env, "run")
            assert done.returncode == 0, done.stderr
        final = check_after_drain(plans, recovered, rows(matrix_db), sandbox.ledger(), sent_ids(matrix_db))

    report = table_of(backend, plans, after_recovery, final, time.monotonic() - t0, cpu)
    print("\n" + report)
    problems = after_recovery.violations + final.violations
    assert not problems, report + "\n" + "\n".join(problems[:40])


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
