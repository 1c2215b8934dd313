"""Enqueue: read messages (CSV, JSON Lines, flags or a program's dicts),
validate every one of them, then insert them in one transaction.

Nothing is written unless every row is valid (or ``skip_invalid`` is given):
an import is one transaction (docs/design.md, G6). Re-importing the same input
inserts nothing twice: every row has a unique dedupe key (``clave``), given or
derived from session, customer, phone and content.

Errors name the input's *physical* line (the CSV header is line 1; a CSV record
spanning several lines is named by the line it starts on), the field and the
reason. Message bodies are never logged; phones only masked (G7).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

import phonenumbers
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from worker import db
from worker.errors import InputError, UsageError
from worker.masking import mask_phone
from worker.schema import CANCELADA, PENDIENTE, claves_podadas, cola_envios, sesiones_envio
from worker.settings import Settings, load_settings
from worker.templates import check as check_templates
from worker.templates import load as load_templates

logger = logging.getLogger(__name__)

FIELDS = (
    "cliente_id",
    "cliente_nombre",
    "telefono",
    "mensaje",
    "plantilla",
    "idioma",
    "parametros",
    "enviar_desde",
    "enviar_hasta",
    "clave",
)
MAX_TEXT = 4096  # WhatsApp's limit for a text body
MAX_PARAM_CHARS = 1024  # WhatsApp's limit for one template body parameter
MAX_PAYLOAD_BYTES = 60_000  # the payload column is TEXT: 65,535 bytes on MySQL
MAX_CLIENTE_ID = 64
MAX_CLIENTE_NOMBRE = 200
MAX_CLAVE = 128
MAX_SESSION_NAME = 200
TEMPLATE_RE = re.compile(r"^[a-z0-9_]{1,512}$")
LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?$")
CSV_PARAM_SEPARATOR = "|"
CHUNK = 500  # rows per pre-select / executemany

# In one-message mode (--to ...) errors name the flag, not a column.
FLAG_FOR_FIELD = {
    "cliente_id": "--customer-id",
    "cliente_nombre": "--name",
    "telefono": "--to",
    "mensaje": "--text",
    "plantilla": "--template",
    "idioma": "--lang",
    "parametros": "--param",
    "enviar_desde": "--send-after",
    "enviar_hasta": "--expires",
    "clave": "--key",
}


class InvalidRow(NamedTuple):
    """One problem: the input's physical line, the field, the reason."""

    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.reason}"


@dataclass(frozen=True, slots=True)
class RawRow:
    """One input record before validation: its line and its values by field name."""

    line: int
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    """One validated row, ready to insert."""

    line: int
    cliente_id: str
    cliente_nombre: str | None
    telefono: str  # E.164
    tipo: str  # text | template
    payload: str  # canonical JSON
    enviar_desde: dt.datetime | None  # naive UTC
    enviar_hasta: dt.datetime | None  # naive UTC
    clave: str


@dataclass(slots=True)
class EnqueueResult:
    inserted: int = 0
    already_queued: int = 0
    invalid: list[InvalidRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inserted": self.inserted,
            "already_queued": self.already_queued,
            "invalid": [{"line": e.line, "field": e.field, "reason": e.reason} for e in self.invalid],
        }


class InvalidRowsError(InputError):
    """Some rows are invalid; nothing was written."""

    def __init__(
        self, invalid: Sequence[InvalidRow], *, naming: Callable[[InvalidRow], str] | None = None
    ) -> None:
        self.invalid = list(invalid)
        if naming is not None:  # one message from flags: no lines, no --skip-invalid
            super().__init__(
                "invalid message; nothing was written:\n" + "\n".join(naming(e) for e in self.invalid)
            )
            return
        lines = "\n".join(str(e) for e in self.invalid)
        bad = len({e.line for e in self.invalid})
        super().__init__(
            f"{bad} invalid row(s); nothing was written "
            f"(use --skip-invalid to import the valid ones):\n{lines}"
        )


# --- reading ----------------------------------------------------------------


def _choose_delimiter(header_line: str) -> str:
    # Spreadsheets in locales with a decimal comma (es-PE, es-AR...) export ';'.
    if "," not in header_line and ";" in header_line:
        return ";"
    return ","


# Input is decoded with errors="surrogateescape" (see open_input): a byte that
# is not UTF-8 becomes one of these code points, so the reader can name the
# physical line that holds it instead of failing on a whole read-ahead buffer.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
RESAVE_HINT = "re-save the file as UTF-8 (e.g. Excel: Save As > CSV UTF-8)"
NOT_UTF8 = f"not valid UTF-8 text; {RESAVE_HINT}"


def _not_utf8(text: str) -> str | None:
    """What in ``text`` (decoded with surrogateescape) is not UTF-8, or None."""
    found = _UNDECODABLE.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return f"not valid UTF-8 text (byte 0x{byte:02x} at column {found.start() + 1})"


def read_csv(stream: IO[str]) -> tuple[list[RawRow], list[InvalidRow]]:
    """Rows of a CSV file with a header row. ``stream`` should be opened with
    ``newline=""`` so quoted fields may span lines (and, to name the line of a
    byte that is not UTF-8, with ``errors="surrogateescape"``). A bad header
    raises :class:`InputError` (no row can be read without it); a bad record
    is returned as an :class:`InvalidRow`."""
    try:
        first = stream.readline()
    except UnicodeDecodeError:
        raise InputError(f"line 1: {NOT_UTF8}") from None
    if first.strip() == "":
        raise InputError("line 1: header: the file is empty; expected a header row (telefono,mensaje,...)")
    reason = _not_utf8(first)
    if reason is not None:
        raise InputError(f"line 1: header: {reason}; {RESAVE_HINT}")
    not_utf8: dict[int, str] = {}  # physical line -> reason

    def numbered() -> Iterator[str]:
        for number, line in enumerate(itertools.chain([first], stream), start=1):
            why = _not_utf8(line)
            if why is not None:
                not_utf8[number] = why
            yield line

    lines = numbered()
    reader = csv.reader(lines, delimiter=_choose_delimiter(first), strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InputError(f"line 1: header: malformed CSV ({exc})") from None
    names = [h.strip().lstrip("\ufeff").strip().lower() for h in header]
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise InputError(
            f"line 1: {unknown[0] or '(empty)'}: unknown column (known columns: {', '.join(FIELDS)})"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"line 1: {dupes[0]}: column given twice")
    if "telefono" not in names:
        raise InputError("line 1: telefono: required column missing")
    if "mensaje" not in names and "plantilla" not in names:
        raise InputError("line 1: mensaje: a mensaje or a plantilla column is required")

    rows: list[RawRow] = []
    errors: list[InvalidRow] = []
    end_of_previous = reader.line_num
    while True:
        start = end_of_previous + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(InvalidRow(start, "(row)", f"malformed CSV: {exc}"))
            # The reader cannot resynchronise after a quoting error: say so, so
            # that --skip-invalid never drops the rest of the file in silence.
            if any(line.strip() for line in lines):
                errors.append(
                    InvalidRow(
                        start, "(rest of file)", "not read after the malformed row: fix it and import again"
                    )
                )
            break
        except UnicodeDecodeError:  # a strict stream: the decoder's buffer, not the line, failed
            errors.append(InvalidRow(start, "(row)", f"{NOT_UTF8} (at or after this line)"))
            break
        end_of_previous = reader.line_num
        bad = [n for n in range(start, end_of_previous + 1) if n in not_utf8]
        if bad:
            where = "" if bad[0] == start else f" (in the record that starts on line {start})"
            errors.append(InvalidRow(bad[0], "(row)", f"{not_utf8[bad[0]]}{where}; {RESAVE_HINT}"))
            continue
        if not record or all(not cell.strip() for cell in record):
            continue  # blank line
        if len(record) != len(names):
            errors.append(
                InvalidRow(start, "(row)", f"{len(record)} fields, but the header has {len(names)}")
            )
            continue
        values: dict[str, Any] = {}
        for name, cell in zip(names, record, strict=True):
            if cell.strip() == "":
                continue  # an empty cell is an absent value
            if name == "parametros":
                values[name] = cell.split(CSV_PARAM_SEPARATOR)
            elif name == "mensaje":
                values[name] = cell  # the body is kept exactly as written
            else:
                values[name] = cell.strip()
        rows.append(RawRow(start, values))
    return rows, errors


def read_jsonl(stream: IO[str]) -> tuple[list[RawRow], list[InvalidRow]]:
    """Rows of a JSON Lines file: one object per line; blank lines are skipped."""
    rows: list[RawRow] = []
    errors: list[InvalidRow] = []
    number = 0
    while True:
        try:
            text = stream.readline()
        except UnicodeDecodeError:  # a strict stream: the decoder's buffer, not the line, failed
            errors.append(InvalidRow(number + 1, "(row)", f"{NOT_UTF8} (at or after this line)"))
            break
        if text == "":
            break
        number += 1
        reason = _not_utf8(text)
        if reason is not None:
            errors.append(InvalidRow(number, "(row)", f"{reason}; {RESAVE_HINT}"))
            continue
        text = text.lstrip("\ufeff") if number == 1 else text
        if text.strip() == "":
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(InvalidRow(number, "(row)", f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(obj, dict):
            errors.append(InvalidRow(number, "(row)", f"expected a JSON object, got {type(obj).__name__}"))
            continue
        rows.append(RawRow(number, obj))
    return rows, errors


def rows_from_mappings(messages: Iterable[Mapping[str, Any]]) -> list[RawRow]:
    """A program's dicts: their "line" is their 1-based index."""
    return [RawRow(i, m) for i, m in enumerate(messages, start=1)]


# --- validation -------------------------------------------------------------


def _as_text(value: Any, name: str, errors: list[str], *, allow_int: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    errors.append(f"{name}\0must be a string, got {type(value).__name__}")
    return None


def _parse_when(value: Any) -> dt.datetime:
    """ISO 8601 -> naive UTC. A naive value is taken as UTC."""
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty")
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date-time: {text[:40]!r}") from None
    else:
        raise ValueError(f"must be an ISO 8601 string, got {type(value).__name__}")
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


def normalise_phone(raw: str, default_region: str | None) -> str:
    """E.164 (``+51987654321``) or :class:`ValueError` with the reason.
    The value itself is never put in the reason (personal data)."""
    text = raw.strip()
    if not text:
        raise ValueError("empty")
    if not text.startswith("+") and default_region is None:
        raise ValueError(
            "number without +country code; write it in E.164 (e.g. +51987654321) "
            "or set COLA_DEFAULT_REGION (e.g. PE)"
        )
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else default_region)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number ({exc._msg})") from None
    if not phonenumbers.is_valid_number(number):
        region = phonenumbers.region_code_for_number(number) or "unknown region"
        raise ValueError(f"not a valid phone number for {region}")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def derive_key(session: str, cliente_id: str, telefono: str, payload: str) -> str:
    """The default dedupe key: stable across runs, hosts and Python versions."""
    material = canonical_json([session, cliente_id, telefono, json.loads(payload)])
    return "sha256:" + hashlib.sha256(material.encode("utf-8")).hexdigest()


def validate_row(
    row: RawRow, *, session: str, default_region: str | None, now: dt.datetime
) -> Message | list[InvalidRow]:
    """One row -> a :class:`Message`, or every problem found in it."""
    problems: list[str] = []  # "field\0reason"
    values = row.values

    def bad(name: str, reason: str) -> None:
        problems.append(f"{name}\0{reason}")

    for key in values:
        if key not in FIELDS:
            bad(str(key), f"unknown field (known: {', '.join(FIELDS)})")

    telefono_raw = _as_text(values.get("telefono"), "telefono", problems, allow_int=True)
    telefono = ""
    if values.get("telefono") is None or (telefono_raw is not None and telefono_raw.strip() == ""):
        bad("telefono", "required")
    elif telefono_raw is not None:
        try:
            telefono = normalise_phone(telefono_raw, default_region)
        except ValueError as exc:
            bad("telefono", str(exc))

    cliente_id = _as_text(values.get("cliente_id"), "cliente_id", problems, allow_int=True)
    if cliente_id is not None:
        cliente_id = cliente_id.strip() or None
    if cliente_id is not None and len(cliente_id) > MAX_CLIENTE_ID:
        bad("cliente_id", f"longer than {MAX_CLIENTE_ID} characters ({len(cliente_id)})")

    nombre = _as_text(values.get("cliente_nombre"), "cliente_nombre", problems)
    if nombre is not None:
        nombre = nombre.strip() or None
    if nombre is not None and len(nombre) > MAX_CLIENTE_NOMBRE:
        bad("cliente_nombre", f"longer than {MAX_CLIENTE_NOMBRE} characters ({len(nombre)})")

    mensaje = _as_text(values.get("mensaje"), "mensaje", problems)
    plantilla = _as_text(values.get("plantilla"), "plantilla", problems)
    idioma = _as_text(values.get("idioma"), "idioma", problems)
    parametros = values.get("parametros")
    content: dict[str, Any] | None = None
    tipo = ""
    if mensaje is not None and plantilla is not None:
        bad("mensaje", "give either mensaje or plantilla, not both")
    elif mensaje is None and plantilla is None:
        if not any(p.startswith(("mensaje\0", "plantilla\0")) for p in problems):
            bad("mensaje", "one of mensaje or plantilla is required")
    elif mensaje is not None:
        tipo = "text"
        if mensaje.strip() == "":
            bad("mensaje", "empty")
        elif len(mensaje) > MAX_TEXT:
            bad("mensaje", f"longer than {MAX_TEXT} characters, WhatsApp's limit ({len(mensaje)})")
        if idioma is not None:
            bad("idioma", "only with plantilla")
        if parametros is not None:
            bad("parametros", "only with plantilla")
        content = {"text": mensaje}
    else:
        assert plantilla is not None
        tipo = "template"
        plantilla = plantilla.strip()
        if not TEMPLATE_RE.match(plantilla):
            bad("plantilla", "template names are 1-512 characters of a-z, 0-9 and _")
        if idioma is None or idioma.strip() == "":
            bad("idioma", "required with plantilla (e.g. es, es_PE, en_US)")
        elif not LANGUAGE_RE.match(idioma.strip()):
            bad("idioma", "not a language code like es, es_PE or en_US")
        else:
            idioma = idioma.strip()
        params: list[str] = []
        if parametros is not None:
            if not isinstance(parametros, list) or not all(isinstance(p, str) for p in parametros):
                bad("parametros", "must be a list of strings")
            elif any(p.strip() == "" for p in parametros):
                bad("parametros", "a parameter is empty (WhatsApp rejects empty parameters)")
            elif any(len(p) > MAX_PARAM_CHARS for p in parametros):
                bad("parametros", f"a parameter is longer than {MAX_PARAM_CHARS} characters")
            else:
                params = list(parametros)
        content = {"template": plantilla, "language": idioma, "params": params}

    desde: dt.datetime | None = None
    hasta: dt.datetime | None = None
    if values.get("enviar_desde") is not None:
        try:
            desde = _parse_when(values["enviar_desde"])
        except ValueError as exc:
            bad("enviar_desde", str(exc))
    if values.get("enviar_hasta") is not None:
        try:
            hasta = _parse_when(values["enviar_hasta"])
        except ValueError as exc:
            bad("enviar_hasta", str(exc))
        else:
            if hasta <= now:
                bad("enviar_hasta", f"already past ({hasta.isoformat()}Z is not after now)")
            elif desde is not None and hasta <= desde:
                bad("enviar_hasta", "must be after enviar_desde")

    clave = _as_text(values.get("clave"), "clave", problems, allow_int=True)
    if clave is not None:
        clave = clave.strip() or None
    if clave is not None and len(clave) > MAX_CLAVE:
        bad("clave", f"longer than {MAX_CLAVE} characters ({len(clave)})")

    if content is not None and not problems:
        size = len(canonical_json(content).encode("utf-8"))
        if size > MAX_PAYLOAD_BYTES:
            bad("parametros" if tipo == "template" else "mensaje", f"the message is too large ({size} bytes)")
    if problems:
        return [InvalidRow(row.line, *p.split("\0", 1)) for p in problems]
    assert content is not None
    payload = canonical_json(content)
    cliente = cliente_id or telefono
    return Message(
        line=row.line,
        cliente_id=cliente,
        cliente_nombre=nombre,
        telefono=telefono,
        tipo=tipo,
        payload=payload,
        enviar_desde=desde,
        enviar_hasta=hasta,
        clave=clave or derive_key(session, cliente, telefono, payload),
    )


def validate_rows(
    rows: Iterable[RawRow], *, session: str, default_region: str | None, now: dt.datetime
) -> tuple[list[Message], list[InvalidRow]]:
    messages: list[Message] = []
    invalid: list[InvalidRow] = []
    for row in rows:
        result = validate_row(row, session=session, default_region=default_region, now=now)
        if isinstance(result, Message):
            messages.append(result)
        else:
            invalid.extend(result)
    return messages, invalid


def check_session_name(session: str) -> str:
    name = (session or "").strip()
    if not name:
        raise InputError("--session: a session name is required")
    if len(name) > MAX_SESSION_NAME:
        raise InputError(f"--session: longer than {MAX_SESSION_NAME} characters")
    return name


# --- writing ----------------------------------------------------------------


def _insert_ignoring_duplicates(conn: Connection, table: sa.Table, key: str) -> Any:
    """INSERT that does nothing when ``key`` (a unique column) already exists.
    Not MySQL's INSERT IGNORE: that would also hide truncation and other errors."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing(index_elements=[key])
    from sqlalchemy.dialects.mysql import insert as mysql_insert

    stmt = mysql_insert(table)
    return stmt.on_duplicate_key_update(id=table.c.id)


def _session_id(conn: Connection, name: str, now: dt.datetime) -> int:
    """Get or create the session (race-safe); refuse a cancelled one."""
    select = sa.select(sesiones_envio.c.id, sesiones_envio.c.estado).where(sesiones_envio.c.nombre == name)
    found = conn.execute(select).first()
    if found is None:
        conn.execute(
            _insert_ignoring_duplicates(conn, sesiones_envio, "nombre"), {"nombre": name, "creado_at": now}
        )
        found = conn.execute(select).one()
    if found.estado == CANCELADA:
        raise InputError(f"--session: session {name!r} is cancelled; import into another session")
    return int(found.id)


def _existing_keys(conn: Connection, keys: Sequence[str]) -> set[str]:
    """The keys already queued: in ``cola_envios``, or in ``claves_podadas``
    (rows that ``prune`` deleted). One statement, ``cola_envios`` first, so a
    row pruned meanwhile is seen either as a row or as its kept key. Keys
    compare byte for byte on every backend (``ExactString``), here as in Python."""
    queued = sa.select(cola_envios.c.clave).where(cola_envios.c.clave.in_(keys))
    pruned = sa.select(claves_podadas.c.clave).where(claves_podadas.c.clave.in_(keys))
    return set(conn.execute(sa.union_all(queued, pruned)).scalars())


def _key_conflicts_within(messages: Sequence[Message]) -> tuple[list[Message], list[InvalidRow]]:
    """A key given twice in one input for two different messages: the second is
    invalid (silently dropping it would lose a message). The same message twice
    is a plain repeat."""
    first: dict[str, Message] = {}
    kept: list[Message] = []
    conflicts: list[InvalidRow] = []
    for m in messages:
        prev = first.setdefault(m.clave, m)
        if prev is not m and (prev.telefono, prev.payload) != (m.telefono, m.payload):
            conflicts.append(
                InvalidRow(m.line, "clave", f"already used on line {prev.line} for a different message")
            )
            continue
        kept.append(m)
    return kept, conflicts


def _write(
    conn: Connection,
    session: str,
    messages: Sequence[Message],
    max_attempts: int,
    advance: Callable[[int], None],
) -> int:
    """Insert the rows whose key is new, in chunks; returns how many were inserted."""
    now = db.db_now(conn)
    sesion_id = _session_id(conn, session, now)
    insert = _insert_ignoring_duplicates(conn, cola_envios, "clave")
    # PostgreSQL and SQLite return the ids of the rows actually inserted (not
    # the ones skipped on conflict), in batches; MySQL's upsert cannot.
    returning = conn.dialect.name in ("postgresql", "sqlite") and conn.dialect.insert_executemany_returning
    inserted = 0
    for start in range(0, len(messages), CHUNK):
        chunk = messages[start : start + CHUNK]
        keys = [m.clave for m in chunk]
        existing = _existing_keys(conn, keys)
        new = [m for m in chunk if m.clave not in existing]
        if new:
            params = [
                {
                    "sesion_id": sesion_id,
                    "cliente_id": m.cliente_id,
                    "cliente_nombre": m.cliente_nombre,
                    "telefono": m.telefono,
                    "tipo": m.tipo,
                    "payload": m.payload,
                    "estado": PENDIENTE,
                    "intentos": 0,
                    "max_intentos": max_attempts,
                    "proximo_intento_at": m.enviar_desde or now,
                    "enviar_hasta": m.enviar_hasta,
                    "clave": m.clave,
                    "creado_at": now,
                    "actualizado_at": now,
                }
                for m in new
            ]
            # A concurrent import may have committed one of these keys since the
            # pre-select (then ours did nothing): count only the rows this
            # transaction wrote.
            if returning:
                inserted += len(conn.execute(insert.returning(cola_envios.c.id), params).all())
            else:  # MySQL: no RETURNING; our rows carry this session and this timestamp
                conn.execute(insert, params)
                inserted += conn.execute(
                    sa.select(sa.func.count())
                    .select_from(cola_envios)
                    .where(
                        cola_envios.c.clave.in_([m.clave for m in new]),
                        cola_envios.c.sesion_id == sesion_id,
                        cola_envios.c.creado_at == now,
                    )
                ).scalar_one()
        advance(len(chunk))
    return inserted


class _Progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._progress: Any = None
        self._task: Any = None
        if enabled and total > 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("enqueue"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._progress.add_task("enqueue", total=total)

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def reset(self) -> None:
        if self._progress is not None:
            self._progress.reset(self._task)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


def _db_call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except sa_exc.DBAPIError as exc:
        translated = db.translate_error(exc)
        if translated is exc:
            raise
        raise translated from exc


def import_rows(
    session: str,
    rows: Sequence[RawRow],
    *,
    engine: Engine,
    settings: Settings,
    skip_invalid: bool = False,
    read_errors: Sequence[InvalidRow] = (),
    progress: bool = False,
    naming: Callable[[InvalidRow], str] | None = None,
) -> EnqueueResult:
    """Validate every row, then write the valid ones in one transaction.

    Raises :class:`InvalidRowsError` (and writes nothing, not even the
    session) when a row is invalid, unless ``skip_invalid``."""
    session = check_session_name(session)
    templates = load_templates(settings.templates_file) if settings.templates_file else None
    now = _db_call(lambda: _read_clock(engine))
    messages, invalid = validate_rows(rows, session=session, default_region=settings.default_region, now=now)
    if templates is not None:
        messages, unknown = check_templates(messages, templates)
        invalid.extend(InvalidRow(*problem) for problem in unknown)
    messages, conflicts = _key_conflicts_within(messages)
    invalid = sorted([*read_errors, *invalid, *conflicts], key=lambda e: e.line)
    if invalid and not skip_invalid:
        raise InvalidRowsError(invalid, naming=naming)

    # The same key twice in one input: the first one is queued, the repeats count as already queued.
    unique: dict[str, Message] = {}
    for m in messages:
        unique.setdefault(m.clave, m)
    to_write = list(unique.values())
    repeats = len(messages) - len(to_write)

    result = EnqueueResult(invalid=invalid)
    if to_write:
        with _Progress(progress, len(to_write)) as bar:

            def work(conn: Connection) -> int:
                bar.reset()  # the transaction may be re-run after a deadlock
                return _write(conn, session, to_write, settings.max_attempts, bar.advance)

            result.inserted = _db_call(lambda: db.transaction(engine, work))
    result.already_queued = len(to_write) - result.inserted + repeats
    logger.info(
        "enqueue session=%s inserted=%d already_queued=%d invalid=%d",
        session,
        result.inserted,
        result.already_queued,
        len({e.line for e in invalid}),
        extra={"action": "enqueue", "session": session},
    )
    return result


def _read_clock(engine: Engine) -> dt.datetime:
    with engine.connect() as conn:
        return db.db_now(conn)


def enqueue(
    session: str,
    messages: Iterable[Mapping[str, Any]],
    *,
    database_url: str | None = None,
    engine: Engine | None = None,
    settings: Settings | None = None,
    skip_invalid: bool = False,
    progress: bool = False,
) -> EnqueueResult:
    """Queue ``messages`` (dicts with the keys of the CSV / JSON Lines input)
    into ``session``, created if missing. Every message is validated first;
    an invalid one raises :class:`InvalidRowsError` and nothing is written,
    unless ``skip_invalid``. Each message's "line" is its 1-based index.

    ``engine`` beats ``database_url``, which beats ``settings`` (default:
    :func:`worker.settings.load_settings`, i.e. the ``COLA_*`` environment)."""
    if settings is None:
        settings = load_settings()
    rows = rows_from_mappings(messages)
    own_engine = engine is None
    if engine is None:
        engine = db.create_engine(database_url or settings.require_database_url())
    try:
        return import_rows(
            session, rows, engine=engine, settings=settings, skip_invalid=skip_invalid, progress=progress
        )
    finally:
        if own_engine:
            engine.dispose()


# --- CLI glue ---------------------------------------------------------------


def _open_input(path: str, option: str) -> io.TextIOWrapper:
    # surrogateescape: a byte that is not UTF-8 is kept (as a lone surrogate)
    # and reported with its own line by the reader; strict decoding would fail
    # on the read-ahead buffer and could only blame the line being read.
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")  # closed by the caller
    except OSError as exc:
        raise InputError(f"{option}: cannot open {path!r}: {exc.strerror}") from None


def _message_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    mapping = {
        "telefono": args.to,
        "mensaje": args.text,
        "cliente_id": args.customer_id,
        "cliente_nombre": args.name,
        "plantilla": args.template,
        "idioma": args.lang,
        "parametros": list(args.param) if args.param else None,
        "enviar_desde": args.send_after,
        "enviar_hasta": args.expires,
        "clave": args.key,
    }
    return {k: v for k, v in mapping.items() if v is not None}


def _flag_naming(error: InvalidRow) -> str:
    return f"{FLAG_FOR_FIELD.get(error.field, error.field)}: {error.reason}"


def command_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    """``cola-worker enqueue``: exit 0 when done (also with --skip-invalid and
    bad rows); raises :class:`UsageError`/:class:`InputError` (exit 2)."""
    sources = [name for name in ("csv", "jsonl", "to") if getattr(args, name, None) is not None]
    if len(sources) != 1:
        raise UsageError("enqueue: give exactly one of --csv FILE, --jsonl FILE or --to PHONE")
    message_flags = (
        "text",
        "customer_id",
        "name",
        "template",
        "lang",
        "param",
        "send_after",
        "expires",
        "key",
    )
    if sources[0] != "to":
        given = [f"--{f.replace('_', '-')}" for f in message_flags if getattr(args, f, None)]
        if given:
            raise UsageError(f"enqueue: {', '.join(given)} only with --to (one message from flags)")

    read_errors: list[InvalidRow] = []
    naming: Callable[[InvalidRow], str] | None = None
    if sources[0] == "to":
        rows = rows_from_mappings([_message_from_flags(args)])
        naming = _flag_naming
        logger.info("enqueue one message to %s", mask_phone(str(args.to)), extra={"action": "enqueue"})
    else:
        path = args.csv if sources[0] == "csv" else args.jsonl
        stream = _open_input(path, "--" + sources[0])
        try:
            rows, read_errors = read_csv(stream) if sources[0] == "csv" else read_jsonl(stream)
        finally:
            if path != "-":
                stream.close()
            else:
                stream.detach()  # leave sys.stdin usable

    engine = db.create_engine_from_settings(settings)
    try:
        db.check_schema(engine)
        try:
            result = import_rows(
                args.session,
                rows,
                engine=engine,
                settings=settings,
                skip_invalid=bool(args.skip_invalid),
                read_errors=read_errors,
                progress=sys.stderr.isatty(),
                naming=naming,
            )
        except InvalidRowsError as exc:
            if args.json:
                failed = EnqueueResult(invalid=exc.invalid).as_dict()
                print(
                    json.dumps({"session": args.session, **failed, "written": False, "error": "invalid rows"})
                )
            raise
    finally:
        engine.dispose()

    if args.json:
        print(json.dumps({"session": args.session, **result.as_dict(), "written": True}))
    else:
        bad_lines = len({e.line for e in result.invalid})
        print(f"inserted {result.inserted}, already queued {result.already_queued}, invalid {bad_lines}")
        for error in result.invalid:
            print(naming(error) if naming else str(error))
    return 0


__all__ = [
    "EnqueueResult",
    "InvalidRow",
    "InvalidRowsError",
    "command_enqueue",
    "enqueue",
    "read_csv",
    "read_jsonl",
    "validate_row",
]
