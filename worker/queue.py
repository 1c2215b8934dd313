"""The queue repository: every SQL statement the run executes, in one place.

Each public method is one short transaction (re-run whole on deadlock or lock
wait timeout). The claim follows docs/design.md sections 1 and 7:

1. ``SELECT id ... WHERE estado='pendiente' AND proximo_intento_at <= now
   ORDER BY proximo_intento_at, id LIMIT n FOR UPDATE SKIP LOCKED`` walks the
   claim index ``(estado, proximo_intento_at, id)`` with no filesort;
2. ``UPDATE ... SET estado='procesando', claim_token=? ... WHERE id IN (...)
   AND estado='pendiente'``; only rows that then carry our token are ours.

Every later write is conditional on ``claim_token`` and ``estado`` (G1): a write
that matches 0 rows means the run lost the row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.schema import (
    ACTIVA,
    CANCELADO,
    ENVIADO,
    ENVIANDO,
    ERROR,
    INCIERTO,
    PENDIENTE,
    PROCESANDO,
    cola_envios,
    ejecuciones,
    envios_whatsapp,
    intentos_envio,
    sesiones_envio,
)

if TYPE_CHECKING:
    from worker.spool import SpoolEntry

logger = logging.getLogger(__name__)

c = cola_envios.c
e = ejecuciones.c

# Provider values are clipped to their columns: one over-long code must not
# make a whole group of outcomes fail to save.
CODE_LEN = int(cola_envios.c.error_codigo.type.length or 32)  # type: ignore[attr-defined]
MSG_ID_LEN = int(cola_envios.c.proveedor_msg_id.type.length or 128)  # type: ignore[attr-defined]

RUN_ACTIVE = "activa"
RUN_FINISHED = "terminada"
RUN_FAILED = "fallida"
RUN_DEAD = "muerta"

# error_codigo of a row that recovery made `incierto` (its run died in flight).
RUN_DIED = "run_died"

# intentos_envio.origen of an answer replayed from the local outcome spool.
ORIGIN_SPOOL = "spool"

# The journal's outcome name of a fenced row whose request never went out
# (its fence could not be confirmed): definitely not sent, no journal row.
NOT_SENT = "not_sent"

# What recording one attempt did.
WRITTEN = "written"
ALREADY = "already"
LOST = "lost"


class LeaseLost(Exception):
    """This run was declared dead by a recovery (its heartbeat was older than the lease)."""


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    id: int
    sesion_id: int
    cliente_id: str
    cliente_nombre: str | None
    telefono: str
    remitente: str | None
    tipo: str
    payload: dict[str, Any]
    intentos: int
    max_intentos: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider call to record."""

    row: ClaimedRow
    token: str
    outcome: Outcome
    started_at: dt.datetime
    latency_ms: int


@dataclass(frozen=True, slots=True)
class Recovered:
    runs: int
    requeued: int  # procesando -> pendiente
    uncertain: int  # enviando -> incierto
    skipped: int = 0  # locked by another session: left to a later recovery


@dataclass(frozen=True, slots=True)
class Replayed:
    applied: int  # rows that got their recorded outcome
    already: int  # answers the database already had
    stale: int  # rows no longer in that attempt: journaled only


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to write for one provider answer."""

    estado: str  # the row's new state
    resultado: str  # the journal's outcome name
    spend_attempt: bool
    delay: float | None = None  # seconds until the next attempt (pendiente)
    code: str | None = None
    text: str | None = None
    http_status: int | None = None
    message_id: str | None = None


_ROW_COLUMNS = (
    c.id,
    c.sesion_id,
    c.cliente_id,
    c.cliente_nombre,
    c.telefono,
    c.remitente,
    c.tipo,
    c.payload,
    c.intentos,
    c.max_intentos,
)


def _row(r: Any) -> ClaimedRow:
    try:
        payload = json.loads(r.payload)
    except ValueError:
        payload = {}
    return ClaimedRow(
        id=int(r.id),
        sesion_id=int(r.sesion_id),
        cliente_id=r.cliente_id,
        cliente_nombre=r.cliente_nombre,
        telefono=r.telefono,
        remitente=r.remitente,
        tipo=r.tipo,
        payload=payload if isinstance(payload, dict) else {},
        intentos=int(r.intentos),
        max_intentos=int(r.max_intentos),
    )


class QueueRepository:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- runs ---------------------------------------------------------------

    def register_run(self, host: str, pid: int, mode: str, lease_seconds: float = 300.0) -> int:
        """A new live run. Its lease is stored with it: recovery judges the run
        by its own lease, whatever lease the recovering process was given."""

        def tx(conn: Connection) -> int:
            now = db.db_now(conn)
            res = conn.execute(
                ejecuciones.insert().values(
                    host=host[:255],
                    pid=pid,
                    modo=mode,
                    iniciada_at=now,
                    latido_at=now,
                    estado=RUN_ACTIVE,
                    lease_segundos=lease_seconds,
                )
            )
            pk = res.inserted_primary_key
            assert pk is not None
            return int(pk[0])

        return db.transaction(self.engine, tx)

    def heartbeat(self, run_id: int, counts: dict[str, int] | None = None) -> bool:
        """False when the run was declared dead by a recovery (it must stop)."""

        def tx(conn: Connection) -> bool:
            now = db.db_now(conn)
            values: dict[str, Any] = {"latido_at": now}
            if counts:
                values.update(counts)
            res = conn.execute(
                ejecuciones.update().where(e.id == run_id, e.estado == RUN_ACTIVE).values(**values)
            )
            return res.rowcount == 1

        return db.transaction(self.engine, tx)

    def finish_run(self, run_id: int, estado: str, counts: dict[str, int]) -> bool:
        """False when a recovery had declared the run dead before it finished."""

        def tx(conn: Connection) -> bool:
            now = db.db_now(conn)
            conn.execute(
                ejecuciones.update()
                .where(e.id == run_id, e.finalizada_at.is_(None))
                .values(finalizada_at=now, latido_at=now, estado=estado, **counts)
            )
            final = conn.execute(sa.select(e.estado).where(e.id == run_id)).scalar_one_or_none()
            return final != RUN_DEAD

        return db.transaction(self.engine, tx)

    def db_clock_offset(self) -> dt.timedelta:
        """Database clock minus this host's UTC clock."""
        with self.engine.connect() as conn:
            return db.db_now(conn) - dt.datetime.now(dt.UTC).replace(tzinfo=None)

    # --- recovery -----------------------------------------------------------

    def recover(self) -> Recovered:
        """Rows of runs silent for longer than their own lease (stored with
        each run; compared on the database's clock): ``procesando ->
        pendiente`` (nothing was sent), ``enviando -> incierto`` (maybe sent).
        A live run's rows are never taken: the run is first marked dead with
        an UPDATE guarded by its heartbeat age, and only rows of runs so marked
        (or already finished) are touched."""

        def tx(conn: Connection) -> Recovered:
            now = db.db_now(conn)
            dead = self._mark_dead_runs(conn, now)
            in_flight = (PROCESANDO, ENVIANDO)
            # Owners of claimed rows that are not live: dead (now or before),
            # finished, or gone. Read without locks; a run is never live again.
            owners = {
                r[0]
                for r in conn.execute(sa.select(c.ejecucion_id).where(c.estado.in_(in_flight)).distinct())
            }
            known = [o for o in owners if o is not None]
            live = (
                {
                    int(r[0])
                    for r in conn.execute(sa.select(e.id).where(e.id.in_(known), e.estado == RUN_ACTIVE))
                }
                if known
                else set()
            )
            gone = [o for o in known if o not in live]
            if not gone and None not in owners:
                return Recovered(runs=dead, requeued=0, uncertain=0)
            orphan = sa.or_(c.ejecucion_id.is_(None), c.ejecucion_id.in_(gone))
            # SKIP LOCKED: a row held by another session (an operator's open
            # transaction) must not stall the start of every run; the next
            # recovery takes it once the lock goes.
            taken = conn.execute(
                sa.select(c.id, c.estado)
                .where(c.estado.in_(in_flight), orphan)
                .with_for_update(skip_locked=True)
            ).all()
            back = [int(r[0]) for r in taken if r[1] == PROCESANDO]
            maybe_sent = [int(r[0]) for r in taken if r[1] == ENVIANDO]
            skipped = conn.execute(
                sa.select(sa.func.count()).select_from(cola_envios).where(c.estado.in_(in_flight), orphan)
            ).scalar_one() - len(taken)
            requeued = uncertain = 0
            for chunk in _chunks(back):
                requeued += conn.execute(
                    cola_envios.update()
                    .where(c.id.in_(chunk), c.estado == PROCESANDO, orphan)
                    .values(estado=PENDIENTE, claim_token=None, ejecucion_id=None, actualizado_at=now)
                ).rowcount
            for chunk in _chunks(maybe_sent):
                # The claim token stays: the answer of that attempt, if it comes
                # (late, or from the outcome spool), still settles the row.
                uncertain += conn.execute(
                    cola_envios.update()
                    .where(c.id.in_(chunk), c.estado == ENVIANDO, orphan)
                    .values(
                        estado=INCIERTO,
                        error_codigo=RUN_DIED,
                        error_texto="the run died between the request and recording its answer",
                        actualizado_at=now,
                    )
                ).rowcount
            return Recovered(runs=dead, requeued=requeued, uncertain=uncertain, skipped=max(0, int(skipped)))

        return db.transaction(self.engine, tx)

    @staticmethod
    def _mark_dead_runs(conn: Connection, now: dt.datetime) -> int:
        """Mark dead every live run whose heartbeat is older than its own lease."""
        silent = conn.execute(
            sa.select(e.id, e.latido_at, e.lease_segundos).where(
                e.finalizada_at.is_(None), e.estado == RUN_ACTIVE
            )
        ).all()
        dead = 0
        for run_id, latido_at, lease in silent:
            cutoff = now - dt.timedelta(seconds=float(lease))
            if latido_at >= cutoff:
                continue
            # Guarded again in the UPDATE: a heartbeat committed meanwhile keeps the run alive.
            dead += conn.execute(
                ejecuciones.update()
                .where(e.id == run_id, e.estado == RUN_ACTIVE, e.latido_at < cutoff)
                .values(estado=RUN_DEAD, finalizada_at=now)
            ).rowcount
        return dead

    # --- claim --------------------------------------------------------------

    def inactive_session_ids(self, conn: Connection) -> list[int]:
        rows = conn.execute(sa.select(sesiones_envio.c.id).where(sesiones_envio.c.estado != ACTIVA))
        return [int(r[0]) for r in rows]

    def session_id(self, name: str) -> int | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(sesiones_envio.c.id).where(sesiones_envio.c.nombre == name)
            ).scalar_one_or_none()
            return int(value) if value is not None else None

    def _due_select(self, now: dt.datetime, limit: int, session_id: int | None, inactive: list[int]) -> Any:
        sel = sa.select(c.id).where(c.estado == PENDIENTE, c.proximo_intento_at <= now)
        if session_id is not None:
            sel = sel.where(c.sesion_id == session_id)
        if inactive:
            # Paused/cancelled sessions, read beforehand: a join here would lock
            # the session rows and make every claimer wait on them.
            sel = sel.where(c.sesion_id.not_in(inactive))
        return sel.order_by(c.proximo_intento_at, c.id).limit(limit)

    def claim_statement(
        self, now: dt.datetime, limit: int, session_id: int | None = None, inactive: Sequence[int] = ()
    ) -> Any:
        """The claim's locking SELECT (the EXPLAIN test checks this very statement)."""
        return self._due_select(now, limit, session_id, list(inactive)).with_for_update(skip_locked=True)

    def claim(self, run_id: int, token: str, limit: int, session_id: int | None = None) -> list[ClaimedRow]:
        def tx(conn: Connection) -> list[ClaimedRow]:
            state = conn.execute(sa.select(e.estado).where(e.id == run_id)).scalar_one_or_none()
            if state != RUN_ACTIVE:
                raise LeaseLost(f"run {run_id} is {state or 'gone'}: a recovery declared it dead")
            inactive = self.inactive_session_ids(conn)
            now = db.db_now(conn)
            ids = [int(r[0]) for r in conn.execute(self.claim_statement(now, limit, session_id, inactive))]
            if not ids:
                return []
            conn.execute(
                cola_envios.update()
                .where(c.id.in_(ids), c.estado == PENDIENTE)
                .values(
                    estado=PROCESANDO,
                    claim_token=token,
                    ejecucion_id=run_id,
                    reclamado_at=now,
                    actualizado_at=now,
                )
            )
            # Only rows carrying our token are ours (on SQLite another process
            # may have taken some between our SELECT and UPDATE).
            rows = conn.execute(
                sa.select(*_ROW_COLUMNS)
                .where(c.id.in_(ids), c.claim_token == token, c.estado == PROCESANDO)
                .order_by(c.proximo_intento_at, c.id)
            )
            return [_row(r) for r in rows]

        return db.transaction(self.engine, tx)

    def preview(self, limit: int, session_id: int | None = None) -> list[ClaimedRow]:
        """What a run would claim now (no lock, no write): for --dry-run."""
        with self.engine.connect() as conn:
            inactive = self.inactive_session_ids(conn)
            now = db.db_now(conn)
            ids_sel = self._due_select(now, limit, session_id, inactive)
            ids = [int(r[0]) for r in conn.execute(ids_sel)]
            if not ids:
                return []
            rows = conn.execute(
                sa.select(*_ROW_COLUMNS).where(c.id.in_(ids)).order_by(c.proximo_intento_at, c.id)
            )
            return [_row(r) for r in rows]

    # --- fence --------------------------------------------------------------

    def fence(self, items: Sequence[tuple[int, str]]) -> tuple[set[int], set[int]]:
        """Move a wave of ``(id, claim token)`` rows ``procesando -> enviando``
        in one committed transaction, just before their requests. Returns
        (fenced ids, expired ids). Rows past ``enviar_hasta`` are cancelled as
        expired instead: never sent late. If it raises, nothing was fenced."""
        by_token: dict[str, list[int]] = {}
        for row_id, token in items:
            by_token.setdefault(token, []).append(row_id)
        if not by_token:
            return set(), set()

        def tx(conn: Connection) -> tuple[set[int], set[int]]:
            now = db.db_now(conn)
            fenced: set[int] = set()
            expired: set[int] = set()
            for token, ids in by_token.items():
                ok, gone = self._fence_token(conn, now, token, ids)
                fenced |= ok
                expired |= gone
            return fenced, expired

        return db.transaction(self.engine, tx)

    def _fence_token(
        self, conn: Connection, now: dt.datetime, token: str, ids: list[int]
    ) -> tuple[set[int], set[int]]:
        mine = sa.and_(c.id.in_(ids), c.claim_token == token, c.estado == PROCESANDO)
        expired = {
            int(r[0])
            for r in conn.execute(
                sa.select(c.id).where(mine, c.enviar_hasta.is_not(None), c.enviar_hasta < now)
            )
        }
        if expired:
            conn.execute(
                cola_envios.update()
                .where(c.id.in_(expired), c.claim_token == token, c.estado == PROCESANDO)
                .values(
                    estado=CANCELADO,
                    claim_token=None,
                    error_codigo="expired",
                    error_texto="expired: enviar_hasta passed before it could be sent",
                    actualizado_at=now,
                )
            )
        rest = [i for i in ids if i not in expired]
        if not rest:
            return set(), expired
        matched = conn.execute(
            cola_envios.update()
            .where(c.id.in_(rest), c.claim_token == token, c.estado == PROCESANDO)
            .values(estado=ENVIANDO, actualizado_at=now)
        ).rowcount
        if matched == len(rest):
            return set(rest), expired
        fenced = {
            int(r[0])
            for r in conn.execute(
                sa.select(c.id).where(c.id.in_(rest), c.claim_token == token, c.estado == ENVIANDO)
            )
        }
        return fenced, expired

    # --- outcomes -----------------------------------------------------------

    def record(
        self, run_id: int, provider: str, attempts: Sequence[Attempt], *, origen: str | None = None
    ) -> list[bool]:
        """Write provider answers, many in one transaction (one commit for a
        whole group of completed sends). Each row update is conditional on its
        token and ``enviando`` (or ``incierto`` because a recovery declared
        the run dead meanwhile: the answer of that very attempt settles it);
        the attempt journal is written either way (it records what the
        provider did, even for a row we lost). Idempotent: an attempt already
        in the journal is not written again, so a write whose COMMIT looked
        failed can simply be retried. ``origen`` goes to the journal (``spool``
        for a replayed answer). Returns, per attempt, whether the row was
        still ours."""
        if not attempts:
            return []

        def tx(conn: Connection) -> list[bool]:
            return [w != LOST for w in self._record(conn, run_id, provider, attempts, origen)]

        return db.transaction(self.engine, tx)

    def replay(self, entries: Sequence[SpoolEntry]) -> Replayed:
        """Record answers read back from the local outcome spool (a run that
        could not record them, e.g. because the database was down), in one
        transaction. A row still in that attempt (same claim token, still
        ``enviando``, or ``incierto`` because its run was declared dead) gets
        the recorded outcome, as the run would have written it; the journal
        row says ``origen='spool'``. Answers already recorded are skipped."""
        if not entries:
            return Replayed(0, 0, 0)

        def tx(conn: Connection) -> Replayed:
            ids = sorted({en.job_id for en in entries})
            found: dict[int, ClaimedRow] = {}
            for chunk in _chunks(ids):
                for r in conn.execute(sa.select(*_ROW_COLUMNS).where(c.id.in_(chunk))):
                    found[int(r.id)] = _row(r)
            groups: dict[tuple[int, str], list[Attempt]] = {}
            for en in entries:
                row = found.get(en.job_id) or ClaimedRow(en.job_id, 0, "", None, "", None, "text", {}, 0, 0)
                attempt = Attempt(
                    dataclasses.replace(row, intentos=en.intentos),
                    en.token,
                    en.outcome,
                    en.started_at,
                    en.latency_ms,
                )
                groups.setdefault((en.run_id, en.provider), []).append(attempt)
            counts = {WRITTEN: 0, ALREADY: 0, LOST: 0}
            for (run_id, provider), attempts in groups.items():
                for w in self._record(conn, run_id, provider, attempts, ORIGIN_SPOOL):
                    counts[w] += 1
            return Replayed(applied=counts[WRITTEN], already=counts[ALREADY], stale=counts[LOST])

        return db.transaction(self.engine, tx)

    def _record(
        self, conn: Connection, run_id: int, provider: str, attempts: Sequence[Attempt], origen: str | None
    ) -> list[str]:
        """The body of :meth:`record`: per attempt WRITTEN, ALREADY (an
        earlier write committed it) or LOST (the row is in another attempt;
        only the journal is written)."""
        now = db.db_now(conn)
        owned: list[str] = []
        ledger: list[dict[str, Any]] = []
        journal: list[dict[str, Any]] = []
        for a in attempts:
            values = _outcome_values(a, provider, now)
            matched = conn.execute(
                cola_envios.update()
                .where(c.id == a.row.id, c.claim_token == a.token, c.estado == ENVIANDO)
                .values(**values)
            ).rowcount
            sent = a.outcome.resultado != NOT_SENT
            if matched == 0 and sent and self._already_recorded(conn, run_id, a):
                # Written by an earlier try whose COMMIT looked failed but was not.
                owned.append(ALREADY)
                continue
            if matched == 0:
                matched = conn.execute(
                    cola_envios.update()
                    .where(
                        c.id == a.row.id,
                        c.claim_token == a.token,
                        c.estado == INCIERTO,
                        c.error_codigo == RUN_DIED,
                    )
                    .values(**values)
                ).rowcount
            owned.append(WRITTEN if matched == 1 else LOST)
            if not sent:  # no provider call: nothing for the journal
                continue
            if matched == 1 and a.outcome.estado == ENVIADO:
                ledger.append(
                    {
                        "cola_envio_id": a.row.id,
                        "sesion_id": a.row.sesion_id,
                        "cliente_id": a.row.cliente_id,
                        "telefono": a.row.telefono,
                        "proveedor": provider,
                        "proveedor_msg_id": _clip(a.outcome.message_id, MSG_ID_LEN),
                        "fecha_envio": now,
                    }
                )
            journal.append(
                {
                    "cola_envio_id": a.row.id,
                    "ejecucion_id": run_id,
                    "inicio_at": a.started_at,
                    "fin_at": now,
                    "resultado": a.outcome.resultado,
                    "http_status": a.outcome.http_status,
                    "codigo": _clip(a.outcome.code, CODE_LEN),
                    "latencia_ms": a.latency_ms,
                    "proveedor_msg_id": _clip(a.outcome.message_id, MSG_ID_LEN),
                    "origen": origen,
                }
            )
        if ledger:
            conn.execute(envios_whatsapp.insert(), ledger)
        if journal:
            conn.execute(intentos_envio.insert(), journal)
        return owned

    @staticmethod
    def _already_recorded(conn: Connection, run_id: int, a: Attempt) -> bool:
        i = intentos_envio.c
        return (
            conn.execute(
                sa.select(i.id)
                .where(i.cola_envio_id == a.row.id, i.ejecucion_id == run_id, i.inicio_at == a.started_at)
                .limit(1)
            ).first()
            is not None
        )

    def release(self, token: str, ids: Sequence[int]) -> int:
        """Give back claimed rows that were not sent (``procesando -> pendiente``)."""
        if not ids:
            return 0

        def tx(conn: Connection) -> int:
            now = db.db_now(conn)
            return int(
                conn.execute(
                    cola_envios.update()
                    .where(c.id.in_(list(ids)), c.claim_token == token, c.estado == PROCESANDO)
                    .values(estado=PENDIENTE, claim_token=None, ejecucion_id=None, actualizado_at=now)
                ).rowcount
            )

        return db.transaction(self.engine, tx)


def _outcome_values(a: Attempt, provider: str, now: dt.datetime) -> dict[str, Any]:
    outcome = a.outcome
    values: dict[str, Any] = {
        "estado": outcome.estado,
        "actualizado_at": now,
        "intentos": a.row.intentos + (1 if outcome.spend_attempt else 0),
    }
    if outcome.estado == ENVIADO:
        values.update(
            enviado_at=now,
            proveedor=provider,
            proveedor_msg_id=_clip(outcome.message_id, MSG_ID_LEN),
            error_codigo=None,
            error_texto=None,
        )
    elif outcome.estado == PENDIENTE:
        values.update(claim_token=None, ejecucion_id=None)
        if outcome.delay is not None:
            values["proximo_intento_at"] = now + dt.timedelta(seconds=outcome.delay)
        if outcome.code is not None or outcome.text is not None:
            values.update(error_codigo=_clip(outcome.code, CODE_LEN), error_texto=_clip(outcome.text))
    else:  # error, incierto
        values.update(
            proveedor=provider, error_codigo=_clip(outcome.code, CODE_LEN), error_texto=_clip(outcome.text)
        )
    return values


def _chunks(ids: Sequence[int], size: int = 500) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _clip(text: str | None, limit: int = 1000) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "CANCELADO",
    "ERROR",
    "INCIERTO",
    "ClaimedRow",
    "Outcome",
    "QueueRepository",
    "Recovered",
]
