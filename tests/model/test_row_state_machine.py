"""A model test of the row state machine (docs/design.md sections 2-4) against a real database.

Hypothesis drives random sequences of what happens to rows in production:
enqueue, claims by competing runs (each with its own run id and tokens), the
fence, every provider result turned into an outcome by the run's own code
(``runner.classify`` then ``QueueRepository.record``), a run that crashes
(its memory is gone) or stalls (it stops heartbeating and may wake up later
with stale tokens), recovery, operator requeue (with and without the
duplicate-risk flag) and cancel, expiry and clock advances. A plain Python
model keeps, per row, the state the contract says it must be in, the one
token that may still write it, how many times the provider accepted it and
how often an operator requeued it from ``incierto``.

After every step the database is read and checked against the model:

- every row is in the state the model predicts;
- at most one claim token per row still matches a conditional write, and it is
  the token of the row's latest claim; every older token matches 0 rows (the
  stale runs' own fence, record and release calls are made and must change nothing);
- ``enviando`` goes back to ``pendiente`` only on a definite not-accepted
  answer (throttled, retryable, sender blocked), never through recovery;
- the provider accepted each row at most once, unless an operator requeued it
  from ``incierto`` (the ledger table never has two entries for one row);
- after a recovery, every row is final, ``pendiente``, or held by a live run;
  at the end of each example, with every run gone and the clock past the
  lease and the backoffs, every row is final or claimed by a fresh run.

Time: recovery judges heartbeats on the database's clock. The test moves
that clock forward honestly by moving every stored timestamp back (heartbeats,
claims, next-attempt times, deadlines), which is what the database would see
if that much time had passed; live runs heartbeat after each advance.

Budget: CI runs 50 examples of up to 30 steps per backend; ``COLA_MODEL_PROFILE=chaos``
(for ``make chaos``) runs 600 of up to 50, and ``COLA_MODEL_EXAMPLES`` /
``COLA_MODEL_STEPS`` set either. Examples are derandomized, so a failure
repeats on the next run; ``COLA_MODEL_RANDOM=1`` explores new ones. Either way
Hypothesis prints the shortest failing sequence of steps it found.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import os
import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import phone

from worker import db, operator
from worker.errors import UsageError
from worker.importer import enqueue
from worker.providers.base import (
    Accepted,
    Ambiguous,
    Permanent,
    Retryable,
    SenderBlocked,
    SendResult,
    Throttled,
)
from worker.queue import RUN_ACTIVE, RUN_FINISHED, Attempt, ClaimedRow, LeaseLost, QueueRepository
from worker.retry import RetryPolicy
from worker.runner import classify
from worker.schema import (
    CANCELADO,
    ENVIADO,
    ENVIANDO,
    ERROR,
    FINAL_STATES,
    INCIERTO,
    PENDIENTE,
    PROCESANDO,
    cola_envios,
    ejecuciones,
    envios_whatsapp,
    intentos_envio,
)
from worker.settings import load_settings

# --- budget ---------------------------------------------------------------------------

CHAOS = os.environ.get("COLA_MODEL_PROFILE") == "chaos"
PROFILE = settings(
    max_examples=int(os.environ.get("COLA_MODEL_EXAMPLES") or (600 if CHAOS else 50)),
    stateful_step_count=int(os.environ.get("COLA_MODEL_STEPS") or (50 if CHAOS else 30)),
    deadline=None,
    derandomize=os.environ.get("COLA_MODEL_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# --- the world ------------------------------------------------------------------------

# Hypothesis replays examples and requires the same steps to give the same model
# state, so every time in the model is far from any boundary that real time
# (a few seconds per example) could cross: the clock moves 1 s at a time at
# most 5 times in a row, or past the lease at once; the earliest a row is due
# again is 15 s after it was put back, and a deadline is 30 s away or past.
LEASE = 300.0  # the lease recovery is called with; also ejecuciones.lease_segundos' default
A_LITTLE = 1.0
MAX_LITTLE = 5  # consecutive small steps
PAST_LEASE = LEASE + 120.0
PAST_EVERYTHING = 10 * 3600.0  # past the lease and the longest backoff
PAIR_INTERVAL = 90.0  # a recipient throttle waits this long


class FixedJitter(RetryPolicy):
    """The run's retry policy with its jitter drawn from a fixed seed, so that
    a replayed example puts its rows back for the same time."""

    def backoff(self, attempts_spent: int, rng: random.Random | None = None) -> float:
        return RetryPolicy.backoff(self, attempts_spent, random.Random(attempts_spent))


POLICY = FixedJitter(base=30.0, cap=600.0)
PROVIDER = "model"
MAX_ROWS = 12
MAX_RUNS = 3
LIVE_STATES = (PROCESANDO, ENVIANDO)  # states in which a claim token can still write

# Provider results by name: (the result, the provider accepted the message, definitely not accepted).
RESULTS: dict[str, tuple[SendResult, bool, bool]] = {
    "accepted": (Accepted("wamid.model", 200), True, False),
    "throttled_sender": (Throttled("sender", 120.0, "130429", "rate limit", 429), False, True),
    "throttled_recipient": (Throttled("recipient", None, "131056", "pair rate limit", 429), False, True),
    "retryable": (Retryable("131000", "temporary", None, 500), False, True),
    "permanent": (Permanent("131026", "invalid recipient", 400), False, False),
    "ambiguous_not_accepted": (Ambiguous("read timeout", None, None), False, False),
    "ambiguous_accepted": (Ambiguous("connection reset after the request", None, None), True, False),
    "sender_blocked": (SenderBlocked("190", "token expired", 401), False, True),
}


def expected_state(kind: str, intentos: int, max_intentos: int) -> tuple[str, int | None]:
    """docs/design.md section 4, written out independently of the runner: the row's
    next state and (for ``pendiente``) its attempt count."""
    if kind == "accepted":
        return ENVIADO, None
    if kind.startswith("throttled") or kind == "sender_blocked":
        return PENDIENTE, intentos  # attempt not spent
    if kind == "retryable":
        return (PENDIENTE, intentos + 1) if intentos + 1 < max_intentos else (ERROR, None)
    if kind == "permanent":
        return ERROR, None
    return INCIERTO, None


@dataclass
class Row:
    id: int
    max_intentos: int
    estado: str = PENDIENTE
    intentos: int = 0
    token: str | None = None  # the one token whose conditional writes may still match
    owner: Run | None = None
    tokens: set[str] = field(default_factory=set)  # every token it was ever claimed with
    accepted: int = 0  # times the provider accepted it (the sandbox ledger's truth)
    incierto_requeues: int = 0  # times an operator requeued it from incierto
    # Made incierto by a recovery that kept the attempt's token: that attempt's
    # late answer may still settle it.
    late_answer_token: str | None = None


@dataclass
class Held:
    row: ClaimedRow
    token: str
    result: str | None = None  # the provider's answer, once the request was made
    started_at: dt.datetime | None = None


@dataclass
class Run:
    """A run as the model sees it: ``status`` is what the process does, ``db_state`` the
    ``ejecuciones.estado`` the contract says it has, ``age`` the database-clock
    seconds since its last heartbeat (model time only)."""

    id: int
    status: str = "live"  # live | stalled | crashed | lost | finished
    db_state: str = RUN_ACTIVE
    age: float = 0.0
    claimed: dict[int, Held] = field(default_factory=dict)  # procesando, in memory
    fenced: dict[int, Held] = field(default_factory=dict)  # enviando, request not answered yet
    answered: dict[int, Held] = field(default_factory=dict)  # answered, outcome not recorded yet

    def forget(self) -> None:
        self.claimed.clear()
        self.fenced.clear()
        self.answered.clear()

    def holds(self) -> bool:
        return bool(self.claimed or self.fenced or self.answered)

    def acts(self) -> bool:
        """A process that still executes code (a lost run finishes what it has in flight)."""
        return self.status in ("live", "lost")


def _pick(items: list[Any], pick: int) -> Any:
    return items[pick % len(items)]


class RowStateMachine(RuleBasedStateMachine):
    def __init__(self, engine: sa.Engine) -> None:
        super().__init__()
        self.engine = engine
        self.repo = QueueRepository(engine)
        self.rows: dict[int, Row] = {}
        self.runs: list[Run] = []
        self.n_enqueued = 0
        self.definite_not_accepted: set[int] = set()  # rows this step may move enviando -> pendiente
        self.previous: dict[int, str] = {}
        self.little_steps = 0  # small clock steps since the last big one
        self.step_completed = True
        with engine.begin() as conn:  # a clean database for each example
            for table in (intentos_envio, envios_whatsapp, cola_envios, ejecuciones):
                conn.execute(table.delete())
            conn.execute(sa.text("DELETE FROM sesiones_envio"))
            conn.execute(sa.text("DELETE FROM claves_podadas"))
        # The test's own reads: one connection, each statement sees the latest commits.
        self.reader = engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    # --- helpers ------------------------------------------------------------------

    def _begin(self) -> None:
        self.step_completed = False
        self.definite_not_accepted = set()

    def _end(self) -> None:
        self.step_completed = True

    def _now(self) -> dt.datetime:
        return db.db_now(self.reader)

    def _acting_runs(self, pred: Any = None) -> list[Run]:
        return [r for r in self.runs if r.acts() and (pred is None or pred(r))]

    def _valid(self, row_id: int, token: str, estado: str) -> bool:
        row = self.rows[row_id]
        return row.token == token and row.estado == estado

    def _lose(self, row: Row, estado: str) -> None:
        """The row leaves its claim: no token writes it any more."""
        row.estado = estado
        row.token = None
        row.owner = None
        row.late_answer_token = None

    def _read(self) -> tuple[dict[int, Any], dict[int, str]]:
        """Every row (with its number of ledger entries) and every run's state."""
        ledger = (
            sa.select(sa.func.count())
            .where(envios_whatsapp.c.cola_envio_id == cola_envios.c.id)
            .scalar_subquery()
            .label("ledger")
        )
        conn = self.reader
        rows = {int(r.id): r for r in conn.execute(sa.select(cola_envios, ledger))}
        e = ejecuciones.c
        runs = {int(r.id): str(r.estado) for r in conn.execute(sa.select(e.id, e.estado))}
        return rows, runs

    def _advance(self, seconds: float) -> None:
        """Move the database clock ``seconds`` forward: every stored timestamp moves back."""
        delta = dt.timedelta(seconds=seconds)
        with self.engine.begin() as conn:
            for table in (cola_envios, ejecuciones, intentos_envio, envios_whatsapp):
                cols = [col for col in table.c if isinstance(col.type, sa.DateTime)]
                params = []
                for r in conn.execute(sa.select(table.c.id, *cols)):
                    values = {"_id": r.id}
                    for col in cols:
                        v = getattr(r, col.name)
                        values["_" + col.name] = v - delta if v is not None else None
                    params.append(values)
                if params:
                    stmt = (
                        table.update()
                        .where(table.c.id == sa.bindparam("_id"))
                        .values({col.name: sa.bindparam("_" + col.name) for col in cols})
                    )
                    conn.execute(stmt, params)
        for run in self.runs:
            for held in run.answered.values():
                if held.started_at is not None:
                    held.started_at -= delta
            if run.status == "live":
                assert self.repo.heartbeat(run.id), f"a live run {run.id} was declared dead"
                run.age = 0.0
            else:
                run.age += seconds

    def _recover(self) -> None:
        before = {i: (r.estado, r.token) for i, r in self.rows.items()}
        # recover(lease) judges every run by the caller's lease; recover() by each
        # run's own stored lease (ejecuciones.lease_segundos, 300 s by default = LEASE).
        by_own_lease = not inspect.signature(self.repo.recover).parameters
        rec = self.repo.recover() if by_own_lease else self.repo.recover(LEASE)
        rows_db, runs_db = self._read()
        dead_now = 0
        for run in self.runs:
            if run.db_state != RUN_ACTIVE:
                continue
            real = runs_db[run.id]
            if run.age > LEASE:
                assert real != RUN_ACTIVE, f"run {run.id}, silent for {run.age:g}s, was not declared dead"
            else:
                assert real == RUN_ACTIVE, f"run {run.id}, silent for {run.age:g}s only, was declared dead"
            if real != RUN_ACTIVE:
                run.db_state = real
                dead_now += 1
        requeued = uncertain = 0
        for row in self.rows.values():
            owner = row.owner
            if row.estado in LIVE_STATES and (owner is None or owner.db_state != RUN_ACTIVE):
                if row.estado == PROCESANDO:
                    self._lose(row, PENDIENTE)
                    requeued += 1
                else:
                    self._lose(row, INCIERTO)
                    uncertain += 1
        for row_id, (estado, token) in before.items():
            now_db, now_model = rows_db[row_id].estado, self.rows[row_id].estado
            # G2/G3 at once, not after later steps: procesando -> pendiente, enviando -> incierto.
            assert now_db == now_model, f"recovery moved row {row_id} {estado} -> {now_db}, not {now_model}"
            if estado == ENVIANDO and now_model == INCIERTO:
                # A recovery that keeps the attempt's token on the row lets that
                # attempt's late answer settle it; one that clears it does not.
                kept = rows_db[row_id].claim_token
                assert kept in (None, token), (row_id, kept)
                self.rows[row_id].late_answer_token = kept
        assert (rec.runs, rec.requeued, rec.uncertain) == (dead_now, requeued, uncertain), rec
        # After a recovery no row is stuck: it is final, pendiente, or held by a live owner.
        for row_id, r in rows_db.items():
            if r.estado in LIVE_STATES:
                owner = next((run for run in self.runs if run.id == r.ejecucion_id), None)
                assert owner is not None and runs_db[owner.id] == RUN_ACTIVE, (row_id, r.estado)
                assert owner.age <= LEASE, (row_id, owner.age)

    # --- rules: the queue -----------------------------------------------------------

    def _enqueue(self, n: int, deadline: float | None, max_attempts: int) -> None:
        now = self._now()
        messages = []
        for _ in range(n):
            k = self.n_enqueued
            self.n_enqueued += 1
            message: dict[str, Any] = {"telefono": phone(k), "mensaje": f"hola {k}", "clave": f"model-{k}"}
            if deadline is not None:
                message["enviar_hasta"] = (now + dt.timedelta(seconds=deadline)).isoformat()
            messages.append(message)
        conf = load_settings(flags={"max_attempts": max_attempts}, environ={})
        result = enqueue("model", messages, engine=self.engine, settings=conf)
        assert result.inserted == n, result
        keys = [m["clave"] for m in messages]
        ids = self.reader.execute(sa.select(cola_envios.c.id).where(cola_envios.c.clave.in_(keys))).scalars()
        for row_id in ids:
            self.rows[int(row_id)] = Row(int(row_id), max_attempts)

    def _start_run(self) -> None:
        run_id = self.repo.register_run("model-host", 10_000 + len(self.runs), "run")
        self.runs.append(Run(run_id))

    @initialize(
        n=st.integers(1, 6),
        deadline=st.sampled_from([None, 30.0, 3600.0]),
        max_attempts=st.integers(1, 3),
        runs=st.integers(1, 2),
    )
    def a_queue_and_its_runs(self, n: int, deadline: float | None, max_attempts: int, runs: int) -> None:
        self._begin()
        self._enqueue(n, deadline, max_attempts)
        for _ in range(runs):
            self._start_run()
        self._end()

    @precondition(lambda self: len(self.rows) < MAX_ROWS)
    @rule(n=st.integers(1, 3), deadline=st.sampled_from([None, 30.0, 3600.0]), max_attempts=st.integers(1, 3))
    def enqueue_rows(self, n: int, deadline: float | None, max_attempts: int) -> None:
        self._begin()
        self._enqueue(n, deadline, max_attempts)
        self._end()

    @precondition(lambda self: any(r.estado not in FINAL_STATES for r in self.rows.values()))
    @rule(pick=st.integers(0, 255), seconds_ago=st.sampled_from([1.0, 60.0]))
    def deadline_passes(self, pick: int, seconds_ago: float) -> None:
        """A waiting row's ``enviar_hasta`` is now in the past (only that deadline moves)."""
        self._begin()
        row = _pick([r for r in self.rows.values() if r.estado not in FINAL_STATES], pick)
        with self.engine.begin() as conn:
            past = db.db_now(conn) - dt.timedelta(seconds=seconds_ago)
            conn.execute(cola_envios.update().where(cola_envios.c.id == row.id).values(enviar_hasta=past))
        self._end()

    @rule(past_the_lease=st.booleans(), then_recover=st.booleans())
    def advance_clock(self, past_the_lease: bool, then_recover: bool) -> None:
        """Time passes: a little (well within the lease and every backoff), or past the
        lease and the backoffs of the first attempts. Live runs heartbeat meanwhile,
        and over a whole lease they also recover (every other beat); otherwise a
        recovery may run anyway (a run starting elsewhere, ``cola-worker recover``)."""
        self._begin()
        big = past_the_lease or self.little_steps >= MAX_LITTLE
        self.little_steps = 0 if big else self.little_steps + 1
        self._advance(PAST_LEASE if big else A_LITTLE)
        if then_recover or (big and any(r.status == "live" for r in self.runs)):
            self._recover()
        self._end()

    # --- rules: runs --------------------------------------------------------------

    @precondition(lambda self: sum(r.status in ("live", "stalled", "lost") for r in self.runs) < MAX_RUNS)
    @rule()
    def start_run(self) -> None:
        """A run starts: it registers, then recovers dead runs' rows (``Runner.execute``)."""
        self._begin()
        self._start_run()
        self._recover()
        self._end()

    def _check_claim(self, run: Run, token: str, got: list[ClaimedRow]) -> None:
        for claimed in got:
            row = self.rows[claimed.id]
            assert row.estado == PENDIENTE, f"claimed row {claimed.id} that was {row.estado}"
            assert claimed.intentos == row.intentos, (claimed, row)
            row.estado = PROCESANDO
            row.token = token
            row.late_answer_token = None
            row.owner = run
            row.tokens.add(token)
            run.claimed[claimed.id] = Held(claimed, token)

    # claim and continue_sending draw their arguments inside (``data``): Hypothesis
    # tries rules with fewer arguments first, and these two make the rows move.
    @precondition(lambda self: self._acting_runs())
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """A run claims up to ``limit`` rows, then takes them ``stages`` steps further:
        one fence for the wave, each request answered (``kinds``), each answer recorded."""
        self._begin()
        run = _pick(self._acting_runs(), data.draw(st.integers(0, 255), label="run"))
        limit = data.draw(st.integers(1, 3), label="limit")
        stages = data.draw(st.integers(0, 3), label="stages")
        kinds = data.draw(st.lists(st.sampled_from(sorted(RESULTS)), min_size=3, max_size=3), label="kinds")
        token = uuid.uuid4().hex
        before = self._now()
        if run.db_state != RUN_ACTIVE:
            with pytest.raises(LeaseLost):
                self.repo.claim(run.id, token, limit)
            self._end()
            return
        got = self.repo.claim(run.id, token, limit)
        assert len(got) <= limit
        if len(got) < limit:
            # Fewer than asked: nothing else was due.
            due = set(
                self.reader.execute(
                    sa.select(cola_envios.c.id).where(
                        cola_envios.c.estado == PENDIENTE, cola_envios.c.proximo_intento_at <= before
                    )
                ).scalars()
            )
            assert not due, f"rows {due} were due but not claimed"
        self._check_claim(run, token, got)
        wave = [run.claimed[r.id] for r in got]
        if stages >= 1 and wave:
            self._fence(run, wave)
        for held, kind in zip(wave, kinds, strict=False):
            if stages >= 2 and held.row.id in run.fenced:
                self._answer(run, held, kind)
            if stages >= 3 and held.row.id in run.answered:
                self._record(run, held)
        self._end()

    @precondition(lambda self: len(self._acting_runs(lambda r: r.db_state == RUN_ACTIVE)) >= 2)
    @rule(limit_a=st.integers(1, 3), limit_b=st.integers(1, 3))
    def competing_claims(self, limit_a: int, limit_b: int) -> None:
        """Two runs claim at the same instant, in two threads: no row goes to both.
        Which run wins which row is up to the database, so both give their rows
        back at once (a replayed example must reach the same model state)."""
        self._begin()
        a, b = self._acting_runs(lambda r: r.db_state == RUN_ACTIVE)[:2]
        barrier = threading.Barrier(2)
        out: dict[int, list[ClaimedRow]] = {}
        errors: list[BaseException] = []

        def go(run: Run, token: str, limit: int) -> None:
            try:
                barrier.wait(timeout=30)
                out[run.id] = self.repo.claim(run.id, token, limit)
            except BaseException as exc:
                errors.append(exc)

        tokens = {a.id: uuid.uuid4().hex, b.id: uuid.uuid4().hex}
        threads = [
            threading.Thread(target=go, args=(run, tokens[run.id], limit))
            for run, limit in ((a, limit_a), (b, limit_b))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        ids_a = {r.id for r in out[a.id]}
        ids_b = {r.id for r in out[b.id]}
        assert not ids_a & ids_b, f"rows {ids_a & ids_b} claimed by both runs"
        for run in (a, b):
            self._check_claim(run, tokens[run.id], out[run.id])
            got = [r.id for r in out[run.id]]
            assert self.repo.release(tokens[run.id], got) == len(got)
            for row_id in got:
                del run.claimed[row_id]
                self._lose(self.rows[row_id], PENDIENTE)
        self._end()

    def _fence(self, run: Run, wave: list[Held]) -> None:
        """``Runner._fence_group``: one committed UPDATE for a wave of claimed rows."""
        ids = [h.row.id for h in wave]
        before = self._now()
        deadlines = dict(
            self.reader.execute(
                sa.select(cola_envios.c.id, cola_envios.c.enviar_hasta).where(cola_envios.c.id.in_(ids))
            ).all()
        )
        fenced, expired = self.repo.fence([(h.row.id, h.token) for h in wave])
        after = self._now()
        for held in wave:
            row_id = held.row.id
            del run.claimed[row_id]
            if not self._valid(row_id, held.token, PROCESANDO):
                assert row_id not in fenced | expired, f"a stale token fenced row {row_id}"
                continue
            deadline = deadlines[row_id]
            if deadline is not None and deadline < before:
                assert row_id in expired, f"row {row_id} past its deadline was not expired"
            elif deadline is None or deadline >= after:
                assert row_id in fenced, f"row {row_id} was not fenced by its owner"
            else:
                assert row_id in fenced | expired
            if row_id in expired:
                self._lose(self.rows[row_id], CANCELADO)
            else:
                self.rows[row_id].estado = ENVIANDO
                run.fenced[row_id] = held

    def _answer(self, run: Run, held: Held, kind: str) -> None:
        """The request goes out and the provider answers (the answer is not recorded yet)."""
        del run.fenced[held.row.id]
        held.result = kind
        held.started_at = self._now()
        if RESULTS[kind][1]:
            self.rows[held.row.id].accepted += 1
        run.answered[held.row.id] = held

    def _record(self, run: Run, held: Held) -> None:
        """The run turns the answer into an outcome and records it, as ``Runner._send_one`` does."""
        del run.answered[held.row.id]
        assert held.result is not None and held.started_at is not None
        result, _, definite = RESULTS[held.result]
        outcome = classify(result, held.row, POLICY, PAIR_INTERVAL)
        attempt = Attempt(held.row, held.token, outcome, held.started_at, latency_ms=5)
        owned = self.repo.record(run.id, PROVIDER, [attempt])
        row = self.rows[held.row.id]
        late = row.estado == INCIERTO and row.late_answer_token == held.token
        mine = self._valid(row.id, held.token, ENVIANDO) or late
        assert owned == [mine], f"record of row {row.id}: owned {owned}, the model says {mine}"
        if mine:
            estado, intentos = expected_state(held.result, held.row.intentos, held.row.max_intentos)
            self._lose(row, estado)
            if intentos is not None:
                row.intentos = intentos
            if definite:
                self.definite_not_accepted.add(row.id)

    @precondition(lambda self: self._acting_runs(lambda r: bool(r.claimed or r.fenced or r.answered)))
    @rule(data=st.data())
    def continue_sending(self, data: st.DataObject) -> None:
        """A run takes one of its rows ``stages`` steps further: claimed -> fenced (alone
        or with every row it holds) -> answered by the provider -> recorded."""
        self._begin()
        runs = self._acting_runs(lambda r: bool(r.claimed or r.fenced or r.answered))
        run = _pick(runs, data.draw(st.integers(0, 255), label="run"))
        held = _pick(
            [*run.claimed.values(), *run.fenced.values(), *run.answered.values()],
            data.draw(st.integers(0, 255), label="row"),
        )
        stages = data.draw(st.integers(1, 3), label="stages")
        whole_wave = data.draw(st.booleans(), label="whole_wave")
        kind = data.draw(st.sampled_from(sorted(RESULTS)), label="kind")
        row_id = held.row.id
        for _ in range(stages):
            if row_id in run.claimed:
                self._fence(run, list(run.claimed.values()) if whole_wave else [held])
            elif row_id in run.fenced:
                self._answer(run, held, kind)
            elif row_id in run.answered:
                self._record(run, held)
            else:
                break
        self._end()

    @precondition(lambda self: self._acting_runs(lambda r: bool(r.claimed)))
    @rule(pick=st.integers(0, 255))
    def release(self, pick: int) -> None:
        """The run gives back rows it claimed and did not send (stopping, or its time is up)."""
        self._begin()
        run = _pick(self._acting_runs(lambda r: bool(r.claimed)), pick)
        expected = 0
        by_token: dict[str, list[int]] = {}
        for held in run.claimed.values():
            by_token.setdefault(held.token, []).append(held.row.id)
            if self._valid(held.row.id, held.token, PROCESANDO):
                expected += 1
                self._lose(self.rows[held.row.id], PENDIENTE)
        released = sum(self.repo.release(token, ids) for token, ids in by_token.items())
        assert released == expected, (released, expected)
        run.claimed.clear()
        self._end()

    def _finish(self, run: Run) -> None:
        """The run ends: unsent claims go back; whatever is fenced or answered and not
        recorded stays ``enviando`` (an outcome that could not be recorded)."""
        for held in run.claimed.values():
            if self._valid(held.row.id, held.token, PROCESANDO):
                assert self.repo.release(held.token, [held.row.id]) == 1
                self._lose(self.rows[held.row.id], PENDIENTE)
            else:
                assert self.repo.release(held.token, [held.row.id]) == 0
        self.repo.finish_run(run.id, RUN_FINISHED, {})
        if run.db_state == RUN_ACTIVE:
            run.db_state = RUN_FINISHED
        run.status = "finished"
        run.forget()

    @precondition(lambda self: any(r.status in ("live", "stalled", "lost") for r in self.runs))
    @rule(pick=st.integers(0, 255), how=st.sampled_from(["crashes", "stalls", "finishes"]))
    def run_ends(self, pick: int, how: str) -> None:
        """A run crashes (SIGKILL: no more heartbeats, its memory is gone), stalls
        (SIGSTOP or a long pause: no heartbeats, memory kept) or finishes."""
        self._begin()
        stoppable = [r for r in self.runs if r.status in ("live", "stalled", "lost")]
        acting = [r for r in stoppable if r.acts()]
        live = [r for r in stoppable if r.status == "live"]
        if how == "stalls" and live:
            _pick(live, pick).status = "stalled"
        elif how == "finishes" and acting:
            self._finish(_pick(acting, pick))
        else:
            run = _pick(stoppable, pick)
            run.status = "crashed"
            run.forget()
        self._end()

    @precondition(lambda self: any(r.status == "stalled" for r in self.runs))
    @rule(pick=st.integers(0, 255), kind=st.sampled_from(sorted(RESULTS)), in_flight=st.booleans())
    def resume(self, pick: int, kind: str, in_flight: bool) -> None:
        """SIGCONT: the run heartbeats, and goes on if it is still alive."""
        self._begin()
        self._wake(_pick([r for r in self.runs if r.status == "stalled"], pick), kind, in_flight)
        self._end()

    def _wake(self, run: Run, kind: str, in_flight: bool) -> None:
        """A stalled run heartbeats. If a recovery declared it dead meanwhile, it has
        lost its lease and does what the runner then does, all with stale tokens:
        the claimed rows already handed to a sending thread try their fence
        (``in_flight``), the others are given back; requests in flight go out and
        are answered (``kind``); every answer is recorded; the run exits."""
        alive = self.repo.heartbeat(run.id)
        assert alive == (run.db_state == RUN_ACTIVE), (alive, run)
        if alive:
            run.status = "live"
            run.age = 0.0
            return
        run.status = "lost"
        if in_flight and run.claimed:
            self._fence(run, list(run.claimed.values()))
        for held in list(run.claimed.values()):
            assert self.repo.release(held.token, [held.row.id]) == 0, "a lost run gave back a row"
            del run.claimed[held.row.id]
        for held in list(run.fenced.values()):
            self._answer(run, held, kind)
        for held in list(run.answered.values()):
            self._record(run, held)
        self.repo.finish_run(run.id, RUN_FINISHED, {})
        run.status = "finished"

    @precondition(lambda self: self._acting_runs(lambda r: r.status == "live" and r.holds()))
    @rule(
        pick=st.integers(0, 255),
        kind=st.sampled_from(sorted(RESULTS)),
        requeue_incierto=st.booleans(),
        others_fence=st.booleans(),
        in_flight=st.booleans(),
    )
    def a_run_pauses_past_its_lease(
        self, pick: int, kind: str, requeue_incierto: bool, others_fence: bool, in_flight: bool
    ) -> None:
        """The scenario G1 is about, in one step: a run holding rows pauses (SIGSTOP,
        a long GC, a frozen VM); the clock passes its lease; another run recovers its
        rows; an operator may requeue the ones made incierto (with the flag); the
        other run claims them again (and may fence them); then the paused run wakes
        up and finishes what it had in flight with its stale tokens."""
        self._begin()
        run = _pick(self._acting_runs(lambda r: r.status == "live" and r.holds()), pick)
        its_rows = [*run.claimed, *run.fenced, *run.answered]
        run.status = "stalled"
        others = [r for r in self.runs if r.status == "live"]
        if not others:
            self._start_run()
            others = [self.runs[-1]]
        self._advance(PAST_LEASE)
        self._recover()
        if requeue_incierto:
            uncertain = [i for i in its_rows if self.rows[i].estado == INCIERTO]
            if uncertain:
                self._requeue(uncertain, flag=True)
        other = others[0]
        token = uuid.uuid4().hex
        got = self.repo.claim(other.id, token, len(self.rows))
        self._check_claim(other, token, got)
        if others_fence and got:
            self._fence(other, [other.claimed[r.id] for r in got])
        self._wake(run, kind, in_flight)
        self._end()

    # --- rules: the operator --------------------------------------------------------

    @precondition(lambda self: bool(self.rows))
    @rule(
        picks=st.lists(st.integers(0, 255), min_size=1, max_size=2),
        action=st.sampled_from(["requeue", "requeue --accept-duplicate-risk", "cancel"]),
    )
    def operator_acts(self, picks: list[int], action: str) -> None:
        self._begin()
        # Mostly rows the action applies to (and rows it must leave alone, e.g. enviando).
        wanted = (*operator.CANCELLABLE, ENVIANDO) if action == "cancel" else operator.REQUEUABLE
        candidates = sorted(i for i, r in self.rows.items() if r.estado in wanted) or sorted(self.rows)
        ids = sorted({_pick(candidates, p) for p in picks})
        if action == "cancel":
            self._cancel(ids)
        else:
            self._requeue(ids, flag=action.endswith("risk"))
        self._end()

    def _requeue(self, ids: list[int], flag: bool) -> None:
        args = argparse.Namespace(ids=ids, session=None, state=None, accept_duplicate_risk=flag, json=False)
        selected = [self.rows[i] for i in ids if self.rows[i].estado in operator.REQUEUABLE]
        refused = not flag and any(r.estado == INCIERTO for r in selected)
        expected = [] if refused else selected
        try:
            out = operator.requeue(self.engine, args)
        except UsageError:
            # Refused, writing nothing: an incierto row without the flag, or nothing to requeue.
            assert not expected, f"requeue of {[r.id for r in expected]} refused"
            return
        assert not refused, "an incierto row was requeued without --accept-duplicate-risk"
        assert out["requeued"] == len(expected), (out, expected)
        for row in expected:
            if row.estado == INCIERTO:
                row.incierto_requeues += 1
            self._lose(row, PENDIENTE)
            row.intentos = 0

    def _cancel(self, ids: list[int]) -> None:
        args = argparse.Namespace(ids=ids, session=None, state=None, json=False)
        expected = [self.rows[i] for i in ids if self.rows[i].estado in operator.CANCELLABLE]
        try:
            out = operator.cancel(self.engine, args)
        except UsageError:  # nothing to cancel (an enviando row may be on the wire)
            assert not expected, f"cancel of {[r.id for r in expected]} refused"
            return
        assert out["cancelled"] == len(expected), (out, expected)
        for row in expected:
            self._lose(row, CANCELADO)

    # --- invariants -----------------------------------------------------------------

    @invariant()
    def database_matches_the_model(self) -> None:
        self.step_completed = False
        rows_db, runs_db = self._read()
        assert set(rows_db) == set(self.rows)
        for row_id, row in self.rows.items():
            r = rows_db[row_id]
            previous = self.previous.get(row_id)
            # G2: enviando -> pendiente only on a definite not-accepted answer, never by recovery.
            if previous == ENVIANDO and r.estado == PENDIENTE:
                assert row_id in self.definite_not_accepted, f"row {row_id}: enviando -> pendiente"
            assert r.estado == row.estado, f"row {row_id} is {r.estado}, the model says {row.estado}"
            if r.estado == PENDIENTE:
                assert r.intentos == row.intentos, (row_id, r.intentos, row.intentos)
            # G1: at most one token may still write the row: its latest claim's.
            writable = {t for t in row.tokens if t == r.claim_token and r.estado in LIVE_STATES}
            assert len(writable) <= 1
            assert writable <= {row.token}, f"row {row_id}: a stale token still matches"
            if row.token is not None:
                assert r.claim_token == row.token and r.estado in LIVE_STATES, (row_id, r.estado)
                assert row.owner is not None and r.ejecucion_id == row.owner.id
            # G2: accepted at most once unless an operator requeued it from incierto.
            assert row.accepted <= 1 + row.incierto_requeues, (row_id, row.accepted, row.incierto_requeues)
            assert r.ledger == (1 if r.estado == ENVIADO else 0), (row_id, r.ledger)
        for run in self.runs:
            assert runs_db[run.id] == run.db_state, (run, runs_db[run.id])
        self.previous = {i: r.estado for i, r in rows_db.items()}
        self.step_completed = True

    def teardown(self) -> None:
        """G3: with every run gone and the clock past the lease and the backoffs,
        recovery leaves every row final or pendiente, and a fresh run claims every
        pendiente row. (Skipped after a failed step, not to mask its error.)"""
        try:
            if self.step_completed:
                self._drain()
        finally:
            self.reader.close()

    def _drain(self) -> None:
        self._begin()
        for run in self.runs:
            if run.status in ("live", "stalled", "lost"):
                run.status = "crashed"
                run.forget()
        self._advance(PAST_EVERYTHING)
        self._recover()
        self.database_matches_the_model()
        waiting = {i for i, r in self.rows.items() if r.estado not in FINAL_STATES}
        assert all(self.rows[i].estado == PENDIENTE for i in waiting)
        fresh = self.repo.register_run("model-host", 1, "run")
        got = self.repo.claim(fresh, uuid.uuid4().hex, len(self.rows) + 1)
        assert {r.id for r in got} == waiting, "rows that no run can claim"


@pytest.fixture
def model_engine(db_url: str) -> Iterator[sa.Engine]:
    """The database under test, without waiting for each commit to reach the disk:
    the model test exercises the statements and their isolation, not durability
    (a crash of the database server is the chaos test's), and thousands of small
    transactions would otherwise wait on fsync."""
    engine = db.create_engine(db_url, pool_size=4)

    @sa.event.listens_for(engine, "connect")
    def _no_fsync_wait(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        if engine.dialect.name == "sqlite":
            cur.execute("PRAGMA synchronous=OFF")
        elif engine.dialect.name == "postgresql":
            cur.execute("SET synchronous_commit = off")
        cur.close()
        if engine.dialect.name == "postgresql":
            dbapi_conn.commit()

    try:
        yield engine
    finally:
        engine.dispose()


def test_the_row_state_machine_keeps_its_guarantees(model_engine: sa.Engine) -> None:
    """Hypothesis prints the minimal failing program of steps if an invariant breaks."""
    run_state_machine_as_test(lambda: RowStateMachine(model_engine), settings=PROFILE)
