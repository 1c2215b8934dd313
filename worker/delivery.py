"""Delivery receipts: every SQL statement of ``cola-worker receipts``.

A provider's status callback says what happened to a message it accepted
(sent, delivered, read, failed). :meth:`DeliveryRepository.ingest` stores a
group of them in one transaction:

1. each status once per message (unique on provider message id and status;
   a duplicate delivery inserts nothing);
2. matched to its row by the job id the provider echoes (Meta's
   ``biz_opaque_callback_data``), else by the provider message id; a status
   whose recipient does not match the row's phone is not matched;
3. the row's delivery state and times (``entrega_*``), in any order: each time
   is kept from the first status that set it, the state only moves forward
   (sent < delivered < read; failed wins);
4. a row still ``incierto`` is settled: the provider knows the message, so it
   accepted it (``incierto -> enviado``, conditional on the state, with an
   ``envios_whatsapp`` row and a journal row ``origen='receipt'``).

A status that arrives while its row is still ``enviando`` (the run has not
recorded the ambiguous answer yet) is stored; :meth:`sweep` settles such rows
once they are ``incierto``. Inbound opt-out words are journaled in
``solicitudes_baja`` (:meth:`_record_opt_outs` is where opt-outs will act).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.schema import (
    ENVIADO,
    INCIERTO,
    Timestamp,
    cola_envios,
    envios_whatsapp,
    estados_entrega,
    intentos_envio,
    solicitudes_baja,
)

logger = logging.getLogger(__name__)

c = cola_envios.c
s = estados_entrega.c

# The provider's word -> the row's delivery state (None: stored, not a delivery state).
DELIVERY_STATE: dict[str, str | None] = {
    "queued": None,
    "accepted": None,
    "sending": None,
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "failed": "failed",
    "undelivered": "failed",
}
_TIME_COLUMN = {
    "sent": "entrega_enviado_at",
    "delivered": "entrega_entregado_at",
    "read": "entrega_leido_at",
    "failed": "entrega_fallido_at",
}
# States a new state may replace (the state only moves forward; failed wins).
_REPLACES = {
    "sent": (),
    "delivered": ("sent",),
    "read": ("sent", "delivered"),
    "failed": ("sent", "delivered", "read"),
}
RECEIPT_ORIGIN = "receipt"
_CHUNK = 500
# Recipients are compared on their last digits: Meta's wa_id may drop or add a
# digit after the country code (Brazil's ninth digit, Mexico's 1).
_RECIPIENT_DIGITS = 8
MSG_ID_LEN = 128
CODE_LEN = 32


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One status from a provider's callback."""

    provider: str  # meta | twilio | webhook
    message_id: str
    status: str  # the provider's word, lower case
    job_id: int | None = None
    recipient: str | None = None  # digits
    code: str | None = None
    occurred_at: dt.datetime | None = None  # naive UTC


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One message a recipient sent us."""

    provider: str
    message_id: str
    sender: str  # the person's number, E.164
    to: str | None  # our number or phone number id
    text: str


@dataclass(slots=True)
class IngestResult:
    new: int = 0
    duplicate: int = 0
    unknown: int = 0  # new statuses for a message id we do not know
    mismatched: int = 0  # job id known but the recipient differs: not matched
    settled: list[int] = field(default_factory=list)
    failed_codes: list[str] = field(default_factory=list)  # failure statuses of matched rows
    by_status: Counter[str] = field(default_factory=Counter)  # new statuses by word
    opt_outs: int = 0
    inbound_other: int = 0

    def add(self, other: IngestResult) -> None:
        self.new += other.new
        self.duplicate += other.duplicate
        self.unknown += other.unknown
        self.mismatched += other.mismatched
        self.settled += other.settled
        self.failed_codes += other.failed_codes
        self.by_status.update(other.by_status)
        self.opt_outs += other.opt_outs
        self.inbound_other += other.inbound_other


def opt_out_word(text: str, words: Iterable[str]) -> str | None:
    """The opt-out word ``text`` consists of (case, accents of case and
    surrounding punctuation ignored), or None."""
    cleaned = text.strip().strip(".!¡¿?,;:'\"()[]* ").casefold()
    for word in words:
        if cleaned == word.strip().casefold():
            return word.strip().upper()
    return None


def parse_words(setting: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in setting.split(",") if w.strip())


def _clip(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[:limit]


def _insert_ignore(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """INSERT that skips rows violating a unique key (another receiver, or a
    duplicate delivery racing this one, may have stored them first)."""
    if not rows:
        return
    name = conn.dialect.name
    stmt: Any
    if name == "postgresql":
        stmt = pg_insert(table).on_conflict_do_nothing()
    elif name in ("mysql", "mariadb"):
        stmt = table.insert().prefix_with("IGNORE")
    else:
        stmt = table.insert().prefix_with("OR IGNORE")
    conn.execute(stmt, rows)


def _digits_tail(number: str | None) -> str:
    digits = "".join(ch for ch in number or "" if ch.isdigit())
    return digits[-_RECIPIENT_DIGITS:]


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    estado: str
    telefono: str
    proveedor_msg_id: str | None


class DeliveryRepository:
    def __init__(self, engine: Engine, opt_out_words: Sequence[str] = ("STOP", "BAJA", "ALTO")) -> None:
        self.engine = engine
        self.opt_out_words = tuple(opt_out_words)

    # --- ingest -------------------------------------------------------------

    def ingest(self, statuses: Sequence[StatusEvent], inbound: Sequence[InboundMessage] = ()) -> IngestResult:
        """Store a group of statuses and inbound messages in one transaction."""
        return db.transaction(self.engine, lambda conn: self._ingest(conn, statuses, inbound))

    def _ingest(
        self, conn: Connection, statuses: Sequence[StatusEvent], inbound: Sequence[InboundMessage]
    ) -> IngestResult:
        result = IngestResult()
        now = db.db_now(conn)
        unique: dict[tuple[str, str], StatusEvent] = {}
        for ev in statuses:
            unique.setdefault((ev.message_id, ev.status), ev)
        existing = self._existing(conn, {mid for mid, _ in unique})
        fresh = [ev for key, ev in unique.items() if key not in existing]
        result.duplicate = len(statuses) - len(fresh)
        rows = self._rows_for(conn, fresh)

        stored: list[dict[str, Any]] = []
        matched: list[tuple[_Row, StatusEvent]] = []
        for ev in fresh:
            row = self._match(ev, rows)
            if row is None:
                if ev.job_id is not None and ev.job_id in rows["job"]:
                    result.mismatched += 1
                else:
                    result.unknown += 1
            else:
                matched.append((row, ev))
            result.by_status[ev.status] += 1
            stored.append(
                {
                    "proveedor": ev.provider,
                    "proveedor_msg_id": ev.message_id,
                    "estado": ev.status,
                    "cola_envio_id": row.id if row is not None else None,
                    "codigo": _clip(ev.code, CODE_LEN),
                    "ocurrido_at": ev.occurred_at,
                    "recibido_at": now,
                }
            )
        result.new = len(stored)
        _insert_ignore(conn, estados_entrega, stored)
        result.failed_codes = self._apply_delivery(conn, now, [(r.id, ev) for r, ev in matched])
        candidates = {r.id: ev for r, ev in matched if r.estado == INCIERTO}
        result.settled = self._settle(conn, now, candidates)
        self._record_inbound(conn, now, inbound, result)
        return result

    @staticmethod
    def _existing(conn: Connection, message_ids: set[str]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        ids = sorted(message_ids)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            found.update(
                (str(r[0]), str(r[1]))
                for r in conn.execute(
                    sa.select(s.proveedor_msg_id, s.estado).where(s.proveedor_msg_id.in_(chunk))
                )
            )
        return found

    @staticmethod
    def _rows_for(conn: Connection, events: Sequence[StatusEvent]) -> dict[str, dict[Any, _Row]]:
        cols = (c.id, c.estado, c.telefono, c.proveedor_msg_id)
        by_job: dict[Any, _Row] = {}
        by_msg: dict[Any, _Row] = {}
        job_ids = sorted({ev.job_id for ev in events if ev.job_id is not None})
        for i in range(0, len(job_ids), _CHUNK):
            for r in conn.execute(sa.select(*cols).where(c.id.in_(job_ids[i : i + _CHUNK]))):
                by_job[int(r.id)] = _Row(int(r.id), r.estado, r.telefono, r.proveedor_msg_id)
        msg_ids = sorted({ev.message_id for ev in events if ev.job_id not in by_job})
        for i in range(0, len(msg_ids), _CHUNK):
            for r in conn.execute(sa.select(*cols).where(c.proveedor_msg_id.in_(msg_ids[i : i + _CHUNK]))):
                by_msg[r.proveedor_msg_id] = _Row(int(r.id), r.estado, r.telefono, r.proveedor_msg_id)
        return {"job": by_job, "msg": by_msg}

    @staticmethod
    def _match(ev: StatusEvent, rows: dict[str, dict[Any, _Row]]) -> _Row | None:
        row = rows["job"].get(ev.job_id) if ev.job_id is not None else None
        if row is not None:
            # A job id is only a number: another system writing to the same
            # account could send the same one. The recipient must agree.
            if ev.recipient and _digits_tail(ev.recipient) != _digits_tail(row.telefono):
                return None
            return row
        return rows["msg"].get(ev.message_id)

    @staticmethod
    def _apply_delivery(
        conn: Connection, now: dt.datetime, matched: Sequence[tuple[int, StatusEvent]]
    ) -> list[str]:
        """Record each status on its row: the first time of each state, the
        furthest state, the failure code. Set-based and order-independent, so
        concurrent receivers and any arrival order give the same row."""
        by_state: dict[str, dict[int, tuple[dt.datetime, str | None]]] = {}
        failed: list[str] = []
        for row_id, ev in matched:
            state = DELIVERY_STATE.get(ev.status)
            if state is None:
                continue
            at = ev.occurred_at or now
            seen = by_state.setdefault(state, {})
            if row_id not in seen or at < seen[row_id][0]:
                seen[row_id] = (at, _clip(ev.code, CODE_LEN))
            if state == "failed":
                failed.append(ev.code or "")
        # One statement per state for the whole group (per-row times in a CASE):
        # one UPDATE per row was the receiver's bottleneck on a busy server.
        for state, per_row in by_state.items():
            ids = sorted(per_row)
            column = cola_envios.c[_TIME_COLUMN[state]]
            times = sa.case(
                {rid: sa.literal(per_row[rid][0], Timestamp) for rid in ids}, value=c.id, else_=column
            )
            whens: list[tuple[Any, Any]] = [(c.entrega_estado.is_(None), sa.literal(state))]
            if _REPLACES[state]:
                whens.append((c.entrega_estado.in_(_REPLACES[state]), sa.literal(state)))
            values: dict[str, Any] = {
                column.name: sa.func.coalesce(column, times),
                "entrega_estado": sa.case(*whens, else_=c.entrega_estado),
            }
            if state == "failed":
                codes = sa.case(
                    {rid: sa.literal(per_row[rid][1], sa.String(CODE_LEN)) for rid in ids},
                    value=c.id,
                    else_=c.entrega_codigo,
                )
                values["entrega_codigo"] = sa.func.coalesce(c.entrega_codigo, codes)
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                conn.execute(cola_envios.update().where(c.id.in_(chunk)).values(**values))
        return failed

    @staticmethod
    def _settle(conn: Connection, now: dt.datetime, candidates: dict[int, StatusEvent]) -> list[int]:
        """``incierto -> enviado`` for rows a status proves accepted (conditional
        on the state: a duplicate delivery, another receiver or an operator
        acting meanwhile makes it match nothing)."""
        settled: list[int] = []
        for row_id, ev in sorted(candidates.items()):
            message_id = _clip(ev.message_id, MSG_ID_LEN)
            matched = conn.execute(
                cola_envios.update()
                .where(c.id == row_id, c.estado == INCIERTO)
                .values(
                    estado=ENVIADO,
                    proveedor_msg_id=message_id,
                    enviado_at=now,
                    claim_token=None,
                    error_codigo=None,
                    error_texto=None,
                    actualizado_at=now,
                )
            ).rowcount
            if matched != 1:
                continue
            row = conn.execute(
                sa.select(c.sesion_id, c.cliente_id, c.telefono, c.proveedor).where(c.id == row_id)
            ).one()
            provider = row.proveedor or ev.provider
            _insert_ignore(
                conn,
                envios_whatsapp,
                [
                    {
                        "cola_envio_id": row_id,
                        "sesion_id": row.sesion_id,
                        "cliente_id": row.cliente_id,
                        "telefono": row.telefono,
                        "proveedor": provider,
                        "proveedor_msg_id": message_id,
                        "fecha_envio": now,
                    }
                ],
            )
            conn.execute(
                intentos_envio.insert().values(
                    cola_envio_id=row_id,
                    ejecucion_id=None,
                    inicio_at=now,
                    fin_at=now,
                    resultado="accepted",
                    proveedor_msg_id=message_id,
                    origen=RECEIPT_ORIGIN,
                    nota=f"incierto settled by a '{ev.status[:16]}' status from {ev.provider}",
                )
            )
            settled.append(row_id)
        if settled:
            logger.info(
                "receipts settled %d incierto row(s)",
                len(settled),
                extra={"action": "settle", "jobs": settled},
            )
        return settled

    # --- inbound ------------------------------------------------------------

    def _record_inbound(
        self, conn: Connection, now: dt.datetime, inbound: Sequence[InboundMessage], result: IngestResult
    ) -> None:
        requests: list[dict[str, Any]] = []
        for msg in inbound:
            word = opt_out_word(msg.text, self.opt_out_words)
            if word is None:
                result.inbound_other += 1  # not stored: we keep no message bodies
                continue
            requests.append(
                {
                    "proveedor": msg.provider,
                    "proveedor_msg_id": _clip(msg.message_id, MSG_ID_LEN),
                    "telefono": msg.sender[:20],
                    "remitente": _clip(msg.to, 64),
                    "palabra": word[:32],
                    "recibido_at": now,
                }
            )
        result.opt_outs = len(requests)
        self._record_opt_outs(conn, requests)

    @staticmethod
    def _record_opt_outs(conn: Connection, requests: list[dict[str, Any]]) -> None:
        """Journal opt-out requests (once per inbound message id). The hook of
        the opt-outs feature: when it exists, the sender's opt-out list is
        written here, in the same transaction."""
        _insert_ignore(conn, solicitudes_baja, requests)
        for r in requests:
            logger.info("opt-out request (%s)", r["palabra"], extra={"action": "opt_out"})

    # --- sweep --------------------------------------------------------------

    def sweep(self, window_seconds: float, limit: int = 500) -> IngestResult:
        """Settle ``incierto`` rows that already have a stored status (it
        arrived while the row was still ``enviando``), and match statuses
        stored as unknown (within the window) to rows that now carry their
        message id."""
        return db.transaction(self.engine, lambda conn: self._sweep(conn, window_seconds, limit))

    def _sweep(self, conn: Connection, window_seconds: float, limit: int) -> IngestResult:
        result = IngestResult()
        now = db.db_now(conn)
        waiting = conn.execute(
            sa.select(c.id, sa.func.min(s.id).label("sid"))
            .select_from(cola_envios.join(estados_entrega, s.cola_envio_id == c.id))
            .where(c.estado == INCIERTO)
            .group_by(c.id)
            .limit(limit)
        ).all()
        if waiting:
            first = {int(r.sid): int(r.id) for r in waiting}
            events = conn.execute(
                sa.select(s.id, s.proveedor, s.proveedor_msg_id, s.estado).where(s.id.in_(list(first)))
            ).all()
            candidates = {
                first[int(e.id)]: StatusEvent(e.proveedor, e.proveedor_msg_id, e.estado) for e in events
            }
            result.settled = self._settle(conn, now, candidates)
        since = now - dt.timedelta(seconds=window_seconds)
        orphans = conn.execute(
            sa.select(s.id, s.proveedor, s.proveedor_msg_id, s.estado, s.codigo, s.ocurrido_at, s.recibido_at)
            .where(s.cola_envio_id.is_(None), s.recibido_at >= since)
            .order_by(s.id)
            .limit(limit)
        ).all()
        if orphans:
            ids = sorted({o.proveedor_msg_id for o in orphans})
            rows = {
                r.proveedor_msg_id: int(r.id)
                for r in conn.execute(sa.select(c.id, c.proveedor_msg_id).where(c.proveedor_msg_id.in_(ids)))
            }
            matched: list[tuple[int, StatusEvent]] = []
            for o in orphans:
                row_id = rows.get(o.proveedor_msg_id)
                if row_id is None:
                    continue
                conn.execute(estados_entrega.update().where(s.id == o.id).values(cola_envio_id=row_id))
                ev = StatusEvent(
                    o.proveedor,
                    o.proveedor_msg_id,
                    o.estado,
                    code=o.codigo,
                    occurred_at=o.ocurrido_at or o.recibido_at,
                )
                matched.append((row_id, ev))
            result.failed_codes = self._apply_delivery(conn, now, matched)
        return result


def incierto_waiting(
    conn: Connection, now: dt.datetime, window_seconds: float, limit: int = 20
) -> dict[str, Any]:
    """``incierto`` rows with no delivery status after the window, with their
    age (since they became incierto): ``{"count": n, "oldest_age_seconds": x,
    "rows": [{"id": ..., "age_seconds": ...}]}`` (at most ``limit`` rows)."""
    cutoff = now - dt.timedelta(seconds=window_seconds)
    has_status = sa.exists().where(s.cola_envio_id == c.id)
    where = sa.and_(c.estado == INCIERTO, c.actualizado_at <= cutoff, ~has_status)
    count = int(conn.execute(sa.select(sa.func.count()).select_from(cola_envios).where(where)).scalar_one())
    rows = conn.execute(
        sa.select(c.id, c.actualizado_at).where(where).order_by(c.actualizado_at, c.id).limit(limit)
    ).all()
    listed = [
        {"id": int(r.id), "age_seconds": round(max(0.0, (now - r.actualizado_at).total_seconds()), 3)}
        for r in rows
    ]
    return {
        "window_seconds": window_seconds,
        "count": count,
        "oldest_age_seconds": listed[0]["age_seconds"] if listed else None,
        "rows": listed,
    }


def delivery_failures(conn: Connection, since: dt.datetime) -> dict[str, int]:
    """Rows whose delivery failed after the provider accepted them, by code."""
    out: dict[str, int] = {}
    for r in conn.execute(
        sa.select(c.entrega_codigo, sa.func.count())
        .where(c.entrega_estado == "failed", c.entrega_fallido_at >= since)
        .group_by(c.entrega_codigo)
    ):
        out[str(r[0] or "-")] = int(r[1])
    return out


__all__ = [
    "DELIVERY_STATE",
    "DeliveryRepository",
    "InboundMessage",
    "IngestResult",
    "StatusEvent",
    "delivery_failures",
    "incierto_waiting",
    "opt_out_word",
]
