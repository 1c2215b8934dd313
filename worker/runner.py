"""The run: recover, claim in batches, fence, send concurrently, record, exit.

Three parts, as in procrastinate's worker: fetching (``_claim_more``), running
a job (``_send_one``, in a thread pool) and saving its outcome
(``QueueRepository.record``). The dispatcher (the main thread) owns the local
queue, the rate limiter and the pair gate; rows move to ``enviando`` only once
their rate and pair slots are granted, in one fence UPDATE per wave.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import queue
import random
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Generic, Literal, TypeVar

from worker import db
from worker.errors import ConfigError, ProviderUnreachable, SenderBlockedError, UsageError
from worker.faults import crash_point
from worker.limits import PairGate, RateLimiter
from worker.masking import mask_customer_id, mask_phone, mask_phones_in
from worker.providers.base import (
    Accepted,
    Ambiguous,
    Permanent,
    Provider,
    Retryable,
    SenderBlocked,
    SendRequest,
    SendResult,
    Throttled,
)
from worker.queue import (
    NOT_SENT,
    RUN_FAILED,
    RUN_FINISHED,
    Attempt,
    ClaimedRow,
    LeaseLost,
    Outcome,
    QueueRepository,
)
from worker.retry import RetryPolicy
from worker.schema import ENVIADO, ERROR, INCIERTO, PENDIENTE
from worker.settings import Settings
from worker.spool import OutcomeSpool, SpoolEntry, spool_path

logger = logging.getLogger(__name__)


@dataclass
class RunCounts:
    claimed: int = 0
    sent: int = 0
    retried: int = 0
    throttled: int = 0
    failed: int = 0
    uncertain: int = 0
    expired: int = 0
    lost: int = 0
    unreachable: int = 0
    released: int = 0
    record_errors: int = 0

    def as_db(self) -> dict[str, int]:
        return {
            "reclamados": self.claimed,
            "enviados": self.sent,
            "errores": self.failed,
            "inciertos": self.uncertain,
            "reintentos": self.retried + self.throttled + self.unreachable,
        }


@dataclass
class RunResult:
    counts: RunCounts
    sender_blocked: SenderBlocked | None = None
    provider_unreachable: Retryable | None = None
    stopped_by_signal: bool = False
    lost_lease: bool = False
    exit_code: int = 0


def classify(result: SendResult, row: ClaimedRow, policy: RetryPolicy, pair_interval: float) -> Outcome:
    """docs/design.md section 4: the provider's result decides the row."""
    if isinstance(result, Accepted):
        return Outcome(
            ENVIADO, "accepted", True, message_id=result.message_id, http_status=result.http_status
        )
    if isinstance(result, Throttled):
        # Meta's pair limit is about one message per 6 s to one recipient.
        floor = max(pair_interval, 6.0) if result.scope == "recipient" else 1.0
        return Outcome(
            PENDIENTE,
            "throttled",
            False,
            delay=policy.throttle_delay(result.retry_after, floor),
            code=result.code,
            text=result.text,
            http_status=result.http_status,
        )
    if isinstance(result, Retryable) and result.unreachable is not None:
        # No connection could be made: nothing was sent. No attempt spent and no
        # backoff; the run stops after a few of these in a row (exit 6).
        return Outcome(PENDIENTE, "unreachable", False, code=result.code, text=result.text)
    if isinstance(result, Retryable):
        spent = row.intentos + 1
        if spent >= row.max_intentos:
            return Outcome(
                ERROR,
                "retryable",
                True,
                code=result.code,
                text=f"attempts exhausted ({spent}/{row.max_intentos}): {result.text or 'retryable error'}",
                http_status=result.http_status,
            )
        delay = max(policy.backoff(spent), result.retry_after or 0.0)
        return Outcome(
            PENDIENTE,
            "retryable",
            True,
            delay=delay,
            code=result.code,
            text=result.text,
            http_status=result.http_status,
        )
    if isinstance(result, Permanent):
        return Outcome(
            ERROR, "permanent", True, code=result.code, text=result.text, http_status=result.http_status
        )
    if isinstance(result, SenderBlocked):
        # Definitely not accepted: back to pendiente untouched (no attempt, no delay).
        return Outcome(PENDIENTE, "sender_blocked", False, code=result.code, text=result.text)
    assert isinstance(result, Ambiguous)
    return Outcome(
        INCIERTO, "ambiguous", True, code=result.code, text=result.text, http_status=result.http_status
    )


_REASON_LEN = 160


def outcome_reason(outcome: Outcome) -> str:
    """The provider's code and text for a log line: clipped, phone numbers masked
    (a provider may echo the recipient in its error text)."""
    text = " ".join((outcome.text or "").split())
    text = mask_phones_in(text)
    if len(text) > _REASON_LEN:
        text = text[: _REASON_LEN - 3] + "..."
    if outcome.code and text and not text.startswith(outcome.code):
        return f"{outcome.code} {text}"
    return outcome.code or text


def outcome_label(outcome: Outcome) -> str:
    """What a row's log line says happened, with the reason of every retry."""
    reason = outcome_reason(outcome) if outcome.estado != ENVIADO else ""
    if outcome.estado == PENDIENTE and outcome.resultado == "unreachable":
        return f"pendiente (unreachable: {reason}; no attempt spent)"
    if outcome.estado == PENDIENTE and outcome.resultado in ("throttled", "retryable"):
        detail = f"{outcome.resultado}: {reason}" if reason else outcome.resultado
        return f"pendiente ({detail}, next in {outcome.delay or 0:.0f}s)"
    return f"{outcome.estado} ({reason})" if reason else outcome.estado


def _describe(exc: BaseException) -> str:
    """A database error in one line (the driver's message; never parameters)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0][:200] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


def customer_label(row: ClaimedRow) -> str:
    """The name for logs: the display name, else the customer id, masked when
    it is a phone number (the id defaults to the phone)."""
    if row.cliente_nombre:
        return row.cliente_nombre
    return mask_customer_id(row.cliente_id)


def build_request(row: ClaimedRow) -> SendRequest:
    p = row.payload
    if row.tipo == "template":
        params = p.get("params") or []
        return SendRequest(
            job_id=str(row.id),
            to=row.telefono,
            sender=row.remitente,
            kind="template",
            template=str(p.get("template") or ""),
            language=str(p.get("language") or ""),
            params=tuple(str(x) for x in params),
        )
    return SendRequest(
        job_id=str(row.id), to=row.telefono, sender=row.remitente, kind="text", text=str(p.get("text") or "")
    )


# A write path silent for less than this is not stalled, whatever the lease
# (a short lease in a test must not turn a slow commit into a lost run).
STALL_FLOOR = 2.0


class WriteWatch:
    """The run's database writes that threads are waiting for (claim, fence,
    record) and how long they have gone without one succeeding. The heartbeat
    renews the lease only while they make progress: a run stuck behind a lock
    must not keep its rows for ever (a failed write that is tried again does
    not count as progress)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting = 0
        self._since = clock()  # the last success, or the start of the oldest wait
        self._failing = False  # the last write that ended failed

    @contextmanager
    def waiting(self) -> Iterator[None]:
        with self._lock:
            if self._waiting == 0 and not self._failing:
                self._since = self._clock()
            self._waiting += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._waiting -= 1
                self._failing = not ok
                if ok:
                    self._since = self._clock()

    def stalled_for(self) -> float:
        """Seconds without a successful write while at least one is awaited, or
        since the first of the failed tries of a write whose retry is pausing
        between tries (else 0)."""
        with self._lock:
            return self._clock() - self._since if self._waiting or self._failing else 0.0

    def waiting_count(self) -> int:
        with self._lock:
            return self._waiting


In = TypeVar("In")
Out = TypeVar("Out")


class GroupCommit(Generic[In, Out]):
    """One writer thread for many sending threads: each thread hands over its
    item and waits until it is committed; the writer takes whatever has
    gathered meanwhile and writes it in one transaction. At high concurrency
    this turns one commit per message into one commit per group (each commit
    costs a log flush on the server); at concurrency 1 it changes nothing.
    An item's write is durable before its thread goes on."""

    def __init__(
        self,
        name: str,
        write: Callable[[list[In]], list[Out]],
        max_group: int = 128,
        watch: WriteWatch | None = None,
    ) -> None:
        self.write = write
        self.max_group = max_group
        self.watch = watch or WriteWatch()
        self._queue: queue.SimpleQueue[tuple[In, Future[Out]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __call__(self, item: In) -> Out:
        fut: Future[Out] = Future()
        with self.watch.waiting():
            self._queue.put((item, fut))
            return fut.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self.max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                group.append(more)
            try:
                results = self.write([item for item, _ in group])
            except Exception as exc:
                if len(group) == 1:
                    group[0][1].set_exception(exc)
                    continue
                # One bad item must not fail the others: write them one by one.
                for item, fut in group:
                    try:
                        fut.set_result(self.write([item])[0])
                    except Exception as one_exc:
                        fut.set_exception(one_exc)
            else:
                for (_, fut), result in zip(group, results, strict=True):
                    fut.set_result(result)


# "error": the fence transaction failed, so the row is still `procesando` with our token.
FenceResult = Literal["fenced", "expired", "lost", "error"]


@dataclass
class _Sent:
    row: ClaimedRow
    outcome: Outcome | None
    result: SendResult | None
    latency_ms: int
    owned: bool
    error: BaseException | None = None
    fence: FenceResult = "fenced"


@dataclass
class Runner:
    settings: Settings
    repo: QueueRepository
    provider: Provider
    provider_name: str
    session_id: int | None = None
    mode: str = "run"
    stop_event: threading.Event = field(default_factory=threading.Event)
    clock: Any = time.monotonic
    spool: OutcomeSpool | None = None  # the local outcome spool (None: answers go straight to the db)

    def __post_init__(self) -> None:
        self.policy = RetryPolicy(self.settings.backoff_base, self.settings.backoff_max)
        self.rate = RateLimiter(self.settings.rate_limit)
        self.pairs = PairGate(self.settings.pair_interval)
        self.counts = RunCounts()
        self.run_id = 0
        self._done_n = 0
        self._blocked: SenderBlocked | None = None
        self._connect_failures = 0  # in a row, with no other answer in between
        self._unreachable: Retryable | None = None
        self._lost_lease = False
        self._offset = dt.timedelta(0)
        self._count_lock = threading.Lock()
        self._hb_stop = threading.Event()
        self.writes = WriteWatch()
        self.heartbeat_withheld = False
        self._signalled = False
        self._provider_raised: str | None = None
        self._last_beat = 0.0  # clock() of the last committed heartbeat (or the registration)
        self._unrecorded = 0  # answers this run gave up recording (kept in the spool)

    # --- the run ------------------------------------------------------------

    def execute(self) -> RunResult:
        s = self.settings
        self.run_id = self.repo.register_run(
            socket.gethostname(), os.getpid(), self.mode, lease_seconds=s.lease_seconds
        )
        self._offset = self.repo.db_clock_offset()
        self._last_beat = self.clock()
        logger.info(
            "run %s started: pid %s, host %s, provider %s, max-jobs %s, max-seconds %g, concurrency %s, "
            "rate %g/s, pair interval %gs, lease %gs",
            self.run_id,
            os.getpid(),
            socket.gethostname(),
            self.provider_name,
            s.max_jobs or "unlimited",
            s.max_seconds,
            s.concurrency,
            s.rate_limit,
            s.pair_interval,
            s.lease_seconds,
            extra={"action": "run_start", "run": self.run_id},
        )
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        estado = RUN_FAILED
        try:
            self._replay_spool()
            self._recover()
            self._dispatch()
            estado = RUN_FINISHED
        finally:
            self.stop_event.set()
            self._hb_stop.set()
            heartbeat.join(timeout=5)
            if self._unrecorded:
                logger.error(
                    "could not record the answers of %d message(s) before this run's lease ran out: "
                    "they are kept in the outcome spool %s and the next run on this host records them",
                    self._unrecorded,
                    self.spool.path if self.spool is not None else "(none)",
                    extra={"action": "record_error"},
                )
            if not self.repo.finish_run(self.run_id, estado, self.counts.as_db()):
                self._lost_lease = True
        code = 0
        if self._blocked is not None:
            code = SenderBlockedError.exit_code
        elif self.counts.record_errors or self._lost_lease or self._provider_raised:
            code = 1
        elif self._unreachable is not None:
            code = ProviderUnreachable.exit_code
        result = RunResult(
            counts=self.counts,
            sender_blocked=self._blocked,
            provider_unreachable=self._unreachable,
            stopped_by_signal=self._signalled,
            lost_lease=self._lost_lease,
            exit_code=code,
        )
        c = self.counts
        logger.info(
            "run %s ended: claimed %d, sent %d, retry later %d, throttled %d, error %d, incierto %d, "
            "unreachable %d, expired %d, released %d, lost %d%s",
            self.run_id,
            c.claimed,
            c.sent,
            c.retried,
            c.throttled,
            c.failed,
            c.uncertain,
            c.unreachable,
            c.expired,
            c.released,
            c.lost,
            " (stopped by signal)" if self._signalled else "",
            extra={"action": "run_end", "run": self.run_id, "counts": c.__dict__},
        )
        if code == 1:
            reasons = []
            if self._lost_lease:
                reasons.append(f"a recovery declared this run dead; it lost {c.lost} row(s)")
            if c.record_errors:
                reasons.append(f"{c.record_errors} outcome(s) could not be recorded")
            if self._provider_raised:
                reasons.append(self._provider_raised)
            logger.error(
                "run %s failed (exit 1): %s", self.run_id, "; ".join(reasons), extra={"action": "run_failed"}
            )
        return result

    def _replay_spool(self) -> None:
        """Answers a previous run on this host could not record: record them
        first (before recovery would call their rows `incierto`)."""
        if self.spool is None:
            return
        entries = self.spool.pending()
        if not entries:
            return
        done = self.repo.replay(entries)
        self.spool.clear()
        logger.warning(
            "outcome spool %s: replayed %d answer(s) a previous run could not record: %d row(s) settled, "
            "%d already recorded, %d no longer in that attempt (left alone)",
            self.spool.path,
            len(entries),
            done.applied,
            done.already,
            done.stale,
            extra={"action": "spool_replay", "run": self.run_id},
        )

    def _recover(self) -> None:
        rec = self.repo.recover()
        if rec.runs or rec.requeued or rec.uncertain or rec.skipped:
            logger.warning(
                "recovered %d dead run(s): %d row(s) back to pendiente, %d to incierto%s",
                rec.runs,
                rec.requeued,
                rec.uncertain,
                f", {rec.skipped} locked by another session left for a later recovery" if rec.skipped else "",
                extra={"action": "recover"},
            )

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: no new claims; messages in flight finish and are recorded."""
        self._signalled = True
        self.stop_event.set()

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, self.settings.lease_seconds / 4)  # at least three beats per lease
        beats = 0
        while not self._hb_stop.wait(interval):
            beats += 1
            if not self._progressing():
                continue  # no renewal: after the lease a recovery may take this run's rows
            try:
                beat_at = self.clock()
                alive = self.repo.heartbeat(self.run_id, self.counts.as_db())  # status shows live counts
                self._last_beat = beat_at
                if alive and beats % 2 == 0:
                    # A long run (or --loop) keeps recovering runs that die meanwhile.
                    self._recover()
            except Exception:
                logger.exception("heartbeat failed", extra={"action": "heartbeat"})
                continue
            if not alive:
                logger.error(
                    "this run was declared dead by a recovery (heartbeat older than the lease): stopping",
                    extra={"action": "lost_lease"},
                )
                self._lost_lease = True
                self.stop_event.set()
                return

    def _progressing(self) -> bool:
        """The heartbeat reflects progress, not only a live process: when no
        database write of this run has succeeded for half a lease (at least
        ``STALL_FLOOR``) while some are awaited (a row lock held by another
        session, a database that hangs), the lease is no longer renewed. It is
        renewed again as soon as a write succeeds."""
        stalled = self.writes.stalled_for()
        if stalled >= max(self.settings.lease_seconds / 2, STALL_FLOOR):
            if not self.heartbeat_withheld:
                self.heartbeat_withheld = True
                logger.error(
                    "no database write of this run has succeeded for %.0fs while %d wait "
                    "(a row lock held by another session? a database that hangs?): heartbeat "
                    "withheld, so after the lease (%gs) a recovery may take this run's rows",
                    stalled,
                    self.writes.waiting_count(),
                    self.settings.lease_seconds,
                    extra={"action": "heartbeat_withheld", "run": self.run_id},
                )
            return False
        if self.heartbeat_withheld:
            self.heartbeat_withheld = False
            logger.warning(
                "database writes succeed again: heartbeat resumed",
                extra={"action": "heartbeat_resumed", "run": self.run_id},
            )
        return True

    # --- dispatcher ---------------------------------------------------------

    def _dispatch(self) -> None:
        s = self.settings
        # --loop stays up until SIGTERM: the per-run caps do not apply.
        looping = self.mode == "loop"
        deadline = float("inf") if looping else self.clock() + s.max_seconds
        pending: deque[tuple[ClaimedRow, str]] = deque()
        inflight: dict[Future[_Sent], tuple[ClaimedRow, str]] = {}
        exhausted = False  # the queue had nothing more due (burst mode ends)
        last_poll = -1e9
        self._unsent: list[tuple[ClaimedRow, str]] = []  # fence failed: still procesando, ours
        pool = ThreadPoolExecutor(max_workers=s.concurrency, thread_name_prefix="send")
        self._fencer: GroupCommit[tuple[int, str], FenceResult] = GroupCommit(
            "fence", self._fence_group, watch=self.writes
        )
        self._recorder: GroupCommit[Attempt, bool] = GroupCommit(
            "record", self._record_group, watch=self.writes
        )
        try:
            while True:
                now = self.clock()
                stopping = (
                    self.stop_event.is_set()
                    or self._blocked is not None
                    or self._unreachable is not None
                    or now >= deadline
                )
                if stopping:
                    self._release(pending)
                    pending.clear()
                    if not inflight:
                        break
                else:
                    capped = bool(s.max_jobs) and not looping
                    want = s.max_jobs - self.counts.claimed if capped else s.batch_size
                    low_water = len(pending) < s.concurrency
                    poll_ok = not exhausted or (looping and now - last_poll >= s.poll_interval)
                    if want > 0 and low_water and poll_ok:
                        try:
                            got = self._claim(min(s.batch_size, want))
                        except LeaseLost as exc:
                            logger.error("%s: stopping", exc, extra={"action": "lost_lease"})
                            self._lost_lease = True
                            self.stop_event.set()
                            continue
                        last_poll = now
                        pending.extend(got)
                        exhausted = len(got) == 0
                    can_claim_more = (not exhausted or looping) and (
                        not capped or self.counts.claimed < s.max_jobs
                    )
                    if not pending and not inflight and not can_claim_more:
                        break
                    self._launch_wave(pool, pending, inflight)

                # Wait for a completion, a token, a pair slot or the next poll.
                timeout = self._next_wake(pending, inflight, exhausted, last_poll, deadline)
                if inflight:
                    done, _ = wait(list(inflight), timeout=timeout, return_when=FIRST_COMPLETED)
                    for fut in done:
                        row, token = inflight.pop(fut)
                        self._finished(fut.result(), row, token)
                elif timeout > 0:
                    self.stop_event.wait(timeout)
        finally:
            pool.shutdown(wait=True)
            self._fencer.close()
            self._recorder.close()
            # Whatever is still claimed and unsent goes back, even after an error.
            try:
                self._release(deque([*pending, *self._unsent]))
            except Exception:
                logger.exception("could not release claimed rows", extra={"action": "release"})

    def _next_wake(
        self,
        pending: deque[tuple[ClaimedRow, str]],
        inflight: dict[Future[_Sent], tuple[ClaimedRow, str]],
        exhausted: bool,
        last_poll: float,
        deadline: float,
    ) -> float:
        now = self.clock()
        wake = deadline
        if pending and len(inflight) < self.settings.concurrency:
            wake = min(wake, max(self.rate.ready_at(), self._earliest_pair(pending, now)))
        if self.mode == "loop" and exhausted:
            wake = min(wake, last_poll + self.settings.poll_interval)
        if self.stop_event.is_set():
            wake = now + 0.05
        return max(0.001, min(wake - now, 1.0)) if wake != float("inf") else 1.0

    def _earliest_pair(self, pending: deque[tuple[ClaimedRow, str]], now: float) -> float:
        best = float("inf")
        for row, _ in pending:
            ready = self.pairs.ready_at(row.telefono, now)
            if ready is not None:
                best = min(best, ready)
                if best <= now:
                    break
        return best

    def _claim(self, n: int) -> list[tuple[ClaimedRow, str]]:
        token = uuid.uuid4().hex
        with self.writes.waiting():
            rows = self.repo.claim(self.run_id, token, n, self.session_id)
        crash_point("after-claim")  # test-only (worker/faults.py)
        self.counts.claimed += len(rows)
        if rows:
            logger.debug("claimed %d row(s)", len(rows), extra={"action": "claim", "rows": len(rows)})
        return [(r, token) for r in rows]

    def _release(self, pending: deque[tuple[ClaimedRow, str]]) -> None:
        if not pending:
            return
        by_token: dict[str, list[int]] = {}
        for row, token in pending:
            by_token.setdefault(token, []).append(row.id)
        for token, ids in by_token.items():
            released = self.repo.release(token, ids)
            self.counts.released += released
            if released < len(ids):  # taken by a recovery meanwhile: no longer ours
                self.counts.lost += len(ids) - released
                logger.warning(
                    "%d claimed row(s) were taken from this run before they were sent",
                    len(ids) - released,
                    extra={"action": "lost"},
                )

    def _launch_wave(
        self,
        pool: ThreadPoolExecutor,
        pending: deque[tuple[ClaimedRow, str]],
        inflight: dict[Future[_Sent], tuple[ClaimedRow, str]],
    ) -> None:
        free = self.settings.concurrency - len(inflight)
        if free <= 0 or not pending:
            return
        wave: list[tuple[ClaimedRow, str]] = []
        now = self.clock()
        in_wave: set[str] = set()
        keep: deque[tuple[ClaimedRow, str]] = deque()
        while pending and len(wave) < free:
            item = pending.popleft()
            row = item[0]
            if row.telefono in in_wave or not self.pairs.can_start(row.telefono, now):
                keep.append(item)
                continue
            if not self.rate.try_acquire(now):
                keep.append(item)
                break
            self.pairs.start(row.telefono)
            in_wave.add(row.telefono)
            wave.append(item)
        keep.extend(pending)
        pending.clear()
        pending.extend(keep)
        if not wave:
            return
        for row, token in wave:
            fut = pool.submit(self._send_one, row, token)
            inflight[fut] = (row, token)

    def _fence_group(self, items: list[tuple[int, str]]) -> list[FenceResult]:
        """The wave of rows whose slots were granted meanwhile: one transaction."""
        fenced, expired = self.repo.fence(items)
        return ["fenced" if i in fenced else "expired" if i in expired else "lost" for i, _ in items]

    def _record_group(self, attempts: list[Attempt]) -> list[bool]:
        """The answers completed meanwhile: to the spool (fsync'ed), then one transaction."""
        if self.spool is not None:
            self.spool.append(
                SpoolEntry(
                    a.row.id,
                    a.token,
                    self.run_id,
                    self.provider_name,
                    a.started_at,
                    a.latency_ms,
                    a.row.intentos,
                    a.outcome,
                )
                for a in attempts
            )
        for a in attempts:
            crash_point("after-answer", a.row.id)  # test-only: answers read (and spooled), not recorded
        owned = self.repo.record(self.run_id, self.provider_name, attempts)
        if self.spool is not None:
            self.spool.recorded([(a.row.id, a.token) for a in attempts])
        return owned

    def _spool_not_sent(self, row: ClaimedRow, token: str) -> None:
        """The fence may have committed although it looked failed: if the row
        is `enviando` under our token, no request ever went out for it. Say so
        in the spool, so the next run puts it back to `pendiente` instead of
        recovery calling it `incierto`."""
        if self.spool is None:
            return
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None) + self._offset
        outcome = Outcome(PENDIENTE, NOT_SENT, False)
        entry = SpoolEntry(row.id, token, self.run_id, self.provider_name, now, 0, row.intentos, outcome)
        try:
            self.spool.append([entry])
        except OSError:
            logger.exception("could not write the outcome spool", extra={"action": "spool"})

    def _until_written(self, what: str, job: int, write: Callable[[], Out]) -> Out:
        """Retry a fence or a record (both idempotent under the row's claim
        token) with backoff until it succeeds or this run's lease is about to
        run out (then raise: the run stops, exit 1)."""
        lease = self.settings.lease_seconds
        delay = 0.05
        first_failure: float | None = None
        while True:
            try:
                return write()
            except Exception as exc:
                now = self.clock()
                if first_failure is None:
                    first_failure = now
                give_up_at = min(self._last_beat + 0.8 * lease, first_failure + lease)
                if now >= give_up_at:
                    raise
                logger.log(
                    logging.WARNING if delay <= 0.05 else logging.DEBUG,  # once per row, not per try
                    "%s of row %s failed (%s): retrying for up to %.1fs more",
                    what,
                    job,
                    _describe(exc),
                    give_up_at - now,
                    extra={"action": f"{what}_retry", "job": str(job)},
                )
                time.sleep(min(delay * random.uniform(0.5, 1.0), max(0.0, give_up_at - now)))
                delay = min(delay * 2, 1.0)

    # --- one message --------------------------------------------------------

    def _send_one(self, row: ClaimedRow, token: str) -> _Sent:
        # Just before the request: procesando -> enviando, committed, or not at all.
        try:
            request = build_request(row)
        except Exception as exc:  # a malformed payload: nothing can go out, ever
            request = None
            bad_payload = f"invalid payload: {type(exc).__name__}"
        try:
            fence = self._until_written("fence", row.id, lambda: self._fencer((row.id, token)))
        except Exception as exc:
            logger.error(
                "fence of row %s failed until the run's lease was about to run out (%s): not sent; stopping",
                row.id,
                _describe(exc),
                exc_info=_traceback_wanted(),
                extra={"action": "fence_error", "job": str(row.id)},
            )
            self._spool_not_sent(row, token)
            self.stop_event.set()
            return _Sent(row, None, None, 0, False, error=exc, fence="error")
        if fence != "fenced":
            return _Sent(row, None, None, 0, False, fence=fence)
        crash_point("after-fence", row.id)
        # The slot was granted before the fence; keep the spacing on the wire too
        # (a slow fence commit must not release a burst).
        pause = self.rate.send_delay(self.clock())
        if pause > 0:
            time.sleep(pause)
        started_at = dt.datetime.now(dt.UTC).replace(tzinfo=None) + self._offset
        t0 = time.monotonic()
        try:
            result: SendResult = (
                self.provider.send(request)
                if request is not None
                else Permanent("invalid_payload", bad_payload)
            )
        except Exception as exc:  # a provider bug: the request may have gone out
            what = f"provider {self.provider_name} raised {type(exc).__name__}: {exc}"
            logger.error(
                "%s (row %s: the request may have gone out, so it becomes incierto); stopping the run",
                what,
                row.id,
                exc_info=_traceback_wanted(),
                extra={"action": "provider_error", "job": str(row.id)},
            )
            # An unexpected error: no new claims, the rest goes back untouched, exit 1.
            self._provider_raised = what
            self.stop_event.set()
            result = Ambiguous(text=f"provider raised {type(exc).__name__}")
        latency_ms = int((time.monotonic() - t0) * 1000)
        outcome = classify(result, row, self.policy, self.settings.pair_interval)
        attempt = Attempt(row, token, outcome, started_at, latency_ms)
        try:
            owned = self._until_written("record", row.id, lambda: self._recorder(attempt))
        except Exception as exc:
            # The row stays `enviando`; its answer stays in the spool for the
            # next run on this host (else recovery will make it `incierto`).
            logger.error(
                "could not record the outcome of row %s until the run's lease was about to run out (%s): "
                "stopping",
                row.id,
                _describe(exc),
                exc_info=_traceback_wanted(),
                extra={"action": "record_error", "job": str(row.id)},
            )
            with self._count_lock:
                self._unrecorded += 1
            self.stop_event.set()
            return _Sent(row, outcome, result, latency_ms, False, exc)
        crash_point("after-record", row.id)
        return _Sent(row, outcome, result, latency_ms, owned)

    def _finished(self, sent: _Sent, row: ClaimedRow, token: str) -> None:
        now = self.clock()
        if sent.fence != "fenced":
            self.pairs.cancel(row.telefono)
            if sent.fence == "error":
                self.counts.record_errors += 1
                self._unsent.append((row, token))
            elif sent.fence == "expired":
                self.counts.expired += 1
                self._log_row(row, "cancelado (expired)", None)
            else:
                self.counts.lost += 1
                logger.warning(
                    "row %s is no longer ours (claim token or state changed): not sent",
                    row.id,
                    extra={"action": "lost", "job": str(row.id)},
                )
            return
        result = sent.result
        extra_wait = 0.0
        if isinstance(result, Throttled):
            self.counts.throttled += 1
            if result.scope == "sender":
                self.rate.throttled(now, result.retry_after)
                logger.warning(
                    "provider throttled the sender (%s): rate now %.2f/s",
                    result.code,
                    self.rate.rate,
                    extra={"action": "throttled"},
                )
            else:
                extra_wait = max(self.settings.pair_interval, result.retry_after or 0.0) * 2
        self.pairs.finish(row.telefono, now, extra_wait)
        self._note_reachability(result)
        if sent.error is not None:
            self.counts.record_errors += 1
            return
        if isinstance(result, SenderBlocked) and self._blocked is None:
            self._blocked = result
            logger.error(
                "provider refused the credentials or blocked the sender (%s: %s): stopping",
                result.code,
                result.text,
                extra={"action": "sender_blocked"},
            )
        if not sent.owned:
            self.counts.lost += 1
            logger.warning(
                "row %s was taken from this run while it was being sent (outcome %s kept in the journal)",
                row.id,
                sent.outcome.resultado if sent.outcome else "?",
                extra={"action": "lost", "job": str(row.id)},
            )
            return
        assert sent.outcome is not None
        estado = sent.outcome.estado
        if estado == ENVIADO:
            self.counts.sent += 1
        elif estado == ERROR:
            self.counts.failed += 1
        elif estado == INCIERTO:
            self.counts.uncertain += 1
        elif sent.outcome.resultado == "retryable":
            self.counts.retried += 1
        elif sent.outcome.resultado == "unreachable":
            self.counts.unreachable += 1
        self._log_row(row, outcome_label(sent.outcome), sent.latency_ms)

    def _note_reachability(self, result: SendResult | None) -> None:
        """Connection failures in a row (nothing sent) stop the run; any answer
        from the provider resets the count."""
        if result is None:
            return
        if not (isinstance(result, Retryable) and result.unreachable is not None):
            self._connect_failures = 0
            return
        self._connect_failures += 1
        if self._unreachable is None and self._connect_failures >= self.settings.max_connect_failures:
            self._unreachable = result
            logger.error(
                "provider unreachable: %d connection(s) in a row to %s failed before anything was sent "
                "(%s): stopping; claimed rows go back to pendiente untouched, no attempt spent",
                self._connect_failures,
                result.unreachable,
                result.text,
                extra={"action": "provider_unreachable", "host": result.unreachable},
            )

    def _log_row(self, row: ClaimedRow, label: str, latency_ms: int | None) -> None:
        with self._count_lock:
            self._done_n += 1
            n = self._done_n
        latency = f" {latency_ms}ms" if latency_ms is not None else ""
        logger.info(
            "[%d/%d] %s %s %s%s",
            n,
            self.counts.claimed,
            customer_label(row),
            mask_phone(row.telefono),
            label,
            latency,
            extra={
                "action": "message",
                "job": str(row.id),
                "n": n,
                "total": self.counts.claimed,
                "customer": customer_label(row),
                "to": mask_phone(row.telefono),
                "outcome": label,
                "latency_ms": latency_ms,
            },
        )


def _traceback_wanted() -> bool:
    """Tracebacks only at COLA_LOG_LEVEL=DEBUG: an operator gets one clear line."""
    return logger.isEnabledFor(logging.DEBUG)


# --- the command ---------------------------------------------------------------


def _install_signal_handlers(runner: Runner) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        logger.warning(
            "%s received: no new claims; finishing messages in flight",
            signal.Signals(signum).name,
            extra={"action": "signal"},
        )
        runner.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _dry_run(repo: QueueRepository, settings: Settings, session_id: int | None) -> int:
    """What a run would send now, why the rest waits, and whether the provider is configured.
    Claims nothing, writes nothing, sends nothing."""
    from worker.providers.registry import build_provider
    from worker.status import collect_status

    limit = settings.max_jobs or 1000
    rows = repo.preview(limit, session_id)
    print(f"dry run: {len(rows)} message(s) would be sent now (nothing claimed, nothing written)")
    for row in rows:
        what = f"template {row.payload.get('template')}" if row.tipo == "template" else "text"
        print(f"  {row.id}\t{customer_label(row)}\t{mask_phone(row.telefono)}\t{what}")
    waiting = [
        s
        for s in collect_status(repo.engine, settings, None)["sessions"]
        if s["not_due_reason"] and (session_id is None or s["id"] == session_id)
    ]
    for s in waiting:
        print(f"  not due: session {s['name']}: {s['counts']['pendiente']} pendiente, {s['not_due_reason']}")
    if settings.provider is None:
        raise ConfigError(
            "COLA_PROVIDER is not set: choose meta, twilio, webhook or fake "
            "(the dry run checks the provider configuration a run would use)"
        )
    provider = build_provider(settings, max_connections=1)  # raises ConfigError naming what is missing
    provider.close()
    print(f"provider {settings.provider}: configuration complete (nothing was sent)")
    return 0


def command_run(args: argparse.Namespace, settings: Settings) -> int:
    """`cola-worker run` after the lock is held."""
    from worker.providers.registry import build_provider

    engine = db.create_engine_from_settings(settings, pool_size=settings.concurrency + 2)
    try:
        db.check_schema(engine)
        repo = QueueRepository(engine)
        session_id = None
        if args.session:
            session_id = repo.session_id(args.session)
            if session_id is None:
                raise UsageError(f"--session: no session named {args.session!r}")
        if args.dry_run:
            return _dry_run(repo, settings, session_id)
        if settings.provider is None:
            raise ConfigError(
                "COLA_PROVIDER is not set: choose meta, twilio, webhook or fake "
                "(nothing is ever marked sent by accident)"
            )
        provider = build_provider(settings, max_connections=settings.concurrency)
        # Next to the lock file we hold: one run on this host uses it at a time.
        spool = OutcomeSpool(spool_path(settings.lock_file))
        try:
            runner = Runner(
                settings,
                repo,
                provider,
                settings.provider,
                session_id=session_id,
                mode="loop" if args.loop else "run",
                spool=spool,
            )
            _install_signal_handlers(runner)
            metrics = None
            if args.loop and settings.metrics_port:
                from worker.metrics import MetricsServer

                metrics = MetricsServer(runner, settings.metrics_port)
                metrics.start()
            try:
                result = runner.execute()
            finally:
                if metrics is not None:
                    metrics.stop()
        finally:
            spool.close()
            provider.close()
        if result.sender_blocked is not None:
            raise SenderBlockedError(
                f"provider refused the credentials or blocked the sender: "
                f"{result.sender_blocked.code or ''} {result.sender_blocked.text}".strip()
            )
        if result.provider_unreachable is not None and result.exit_code == ProviderUnreachable.exit_code:
            down = result.provider_unreachable
            raise ProviderUnreachable(
                f"provider unreachable: {settings.max_connect_failures} connection(s) in a row to "
                f"{down.unreachable} failed before anything was sent ({down.text}); "
                f"rows returned to pendiente untouched, no attempt spent"
            )
        return result.exit_code
    except Exception as exc:
        raise db.translate_error(exc) from exc
    finally:
        engine.dispose()
