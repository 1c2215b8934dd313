"""Operator actions: requeue (incierto needs --accept-duplicate-risk), cancel,
pause/resume, prune; each refuses without writing anything."""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import execute, phone, rows, run_worker, scalar, seed, states, worker_env

from worker import db, operator
from worker.errors import UsageError
from worker.sandbox import SandboxServer
from worker.schema import ACTIVA, PAUSADA


def test_requeue_error_freely_and_incierto_only_with_the_flag(db_url: str, tmp_path: Path) -> None:
    [failed, unsure] = seed(db_url, 2)
    execute(db_url, "UPDATE cola_envios SET estado = 'error', intentos = 3 WHERE id = :i", i=failed)
    execute(db_url, "UPDATE cola_envios SET estado = 'incierto', intentos = 1 WHERE id = :i", i=unsure)
    env = worker_env(db_url, tmp_path)
    refused = run_worker(env, "requeue", "--id", str(failed), "--id", str(unsure))
    assert refused.returncode == 2 and "--accept-duplicate-risk" in refused.stderr
    assert states(db_url) == Counter({"error": 1, "incierto": 1})  # nothing half written
    ok = run_worker(env, "requeue", "--session", "s1")  # default: the session's error rows
    assert ok.returncode == 0, ok.stderr
    assert rows(db_url)[failed]["estado"] == "pendiente" and rows(db_url)[failed]["intentos"] == 0
    risky = run_worker(env, "requeue", "--id", str(unsure), "--accept-duplicate-risk", "--json")
    assert risky.returncode == 0 and '"of_which_incierto": 1' in risky.stdout
    assert states(db_url) == Counter({"pendiente": 2})


def test_cancel_never_touches_a_row_on_the_wire(db_url: str, tmp_path: Path) -> None:
    [waiting, sending] = seed(db_url, 2)
    execute(db_url, "UPDATE cola_envios SET estado = 'enviando', claim_token = 't' WHERE id = :i", i=sending)
    proc = run_worker(worker_env(db_url, tmp_path), "cancel", "--session", "s1")
    assert proc.returncode == 0, proc.stderr
    table = rows(db_url)
    assert table[waiting]["estado"] == "cancelado" and table[sending]["estado"] == "enviando"
    assert scalar(db_url, "SELECT estado FROM sesiones_envio") == "cancelada"
    assert run_worker(worker_env(db_url, tmp_path), "resume", "--session", "s1").returncode == 2


def test_pause_and_resume_a_session(db_url: str, tmp_path: Path) -> None:
    seed(db_url, 1)
    env = worker_env(db_url, tmp_path)
    assert run_worker(env, "pause", "--session", "s1").returncode == 0
    assert scalar(db_url, "SELECT estado FROM sesiones_envio") == "pausada"
    dry = run_worker(env, "run", "--dry-run")
    assert "0 message(s) would be sent" in dry.stdout
    assert run_worker(env, "resume", "--session", "s1").returncode == 0
    assert "1 message(s) would be sent" in run_worker(env, "run", "--dry-run").stdout
    assert run_worker(env, "pause", "--session", "nope").returncode == 2


def test_prune_deletes_only_old_finished_rows_in_batches(db_url: str, tmp_path: Path) -> None:
    [old_sent, old_pending, new_sent] = seed(db_url, 3)
    execute(db_url, "UPDATE cola_envios SET estado = 'enviado' WHERE id IN (:a, :b)", a=old_sent, b=new_sent)
    execute(
        db_url,
        "INSERT INTO intentos_envio (cola_envio_id, inicio_at, resultado) SELECT id, creado_at, 'accepted' "
        "FROM cola_envios WHERE id = :a",
        a=old_sent,
    )
    execute(
        db_url,
        "UPDATE cola_envios SET actualizado_at = :t WHERE id IN (:a, :b)",
        t="2020-01-01 00:00:00",
        a=old_sent,
        b=old_pending,
    )
    proc = run_worker(worker_env(db_url, tmp_path), "prune", "--older-than-days", "30", "--batch", "1")
    assert proc.returncode == 0, proc.stderr
    assert "pruned 1 finished row(s)" in proc.stdout
    assert sorted(rows(db_url)) == [old_pending, new_sent]  # a pending row is never pruned, however old
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio") == 0


# --- races: each decision and its write are one conditional statement ---------


class Interleave:
    """Commits ``sql`` from another connection, in another thread, just before
    the first statement of the action under test that starts with one of
    ``before`` (upper case): between the action's decision and its write.

    It waits up to ``wait`` seconds for that commit. When the action already
    holds a lock the other write needs, the other write commits after the
    action instead; ``committed_first`` says which happened."""

    def __init__(
        self,
        engine: sa.Engine,
        url: str,
        before: tuple[str, ...],
        sql: str,
        wait: float = 30.0,
        **params: Any,
    ) -> None:
        self.engine, self.url, self.before, self.sql, self.wait, self.params = (
            engine,
            url,
            before,
            sql,
            wait,
            params,
        )
        self.thread: threading.Thread | None = None
        self.committed = threading.Event()
        self.committed_first = False
        self.error: BaseException | None = None
        sa.event.listen(engine, "before_cursor_execute", self._hook)

    def _hook(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if self.thread is not None or not statement.lstrip().upper().startswith(self.before):
            return
        self.thread = threading.Thread(target=self._other, daemon=True)
        self.thread.start()
        self.committed_first = self.committed.wait(self.wait)

    def _other(self) -> None:
        try:
            other = db.create_engine(self.url)
            try:
                db.transaction(other, lambda conn: conn.execute(sa.text(self.sql), self.params))
                self.committed.set()
            finally:
                other.dispose()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._hook)
        assert self.thread is not None, f"the action never ran a statement starting with {self.before}"
        self.thread.join(120)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def _args(**values: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"ids": None, "session": None, "state": None, "accept_duplicate_risk": False}
    return argparse.Namespace(**{**base, **values})


def _attempt(url: str, row_id: int) -> None:
    execute(
        url,
        "INSERT INTO intentos_envio (cola_envio_id, inicio_at, resultado) "
        "SELECT id, creado_at, 'retryable' FROM cola_envios WHERE id = :i",
        i=row_id,
    )


def test_requeue_without_the_flag_never_takes_a_row_that_turned_incierto_meanwhile(
    db_url: str, engine: sa.Engine
) -> None:
    """`requeue --id A --id B`: B is `enviando` when requeue looks, and a
    recovery turns it `incierto` before requeue writes. Without
    --accept-duplicate-risk B must stay `incierto` (it may have been delivered)."""
    [failed, in_flight] = seed(db_url, 2)
    execute(db_url, "UPDATE cola_envios SET estado = 'error', intentos = 3 WHERE id = :i", i=failed)
    execute(
        db_url, "UPDATE cola_envios SET estado = 'enviando', claim_token = 't' WHERE id = :i", i=in_flight
    )
    race = Interleave(
        engine,
        db_url,
        ("UPDATE COLA_ENVIOS",),
        "UPDATE cola_envios SET estado = 'incierto', claim_token = NULL "
        "WHERE id = :i AND estado = 'enviando'",
        i=in_flight,
    )
    refused: UsageError | None = None
    try:
        operator.requeue(engine, _args(ids=[failed, in_flight]))
    except UsageError as exc:
        refused = exc
    race.finish()
    assert race.committed_first  # the row really turned incierto between the look and the write
    assert rows(db_url)[in_flight]["estado"] == "incierto"
    assert refused is not None and "--accept-duplicate-risk" in str(refused)
    assert rows(db_url)[failed]["estado"] == "error"  # refused whole: nothing half written


@pytest.mark.parametrize("action", ["pause", "resume"])
def test_pause_and_resume_never_revive_a_session_cancelled_meanwhile(
    db_url: str, engine: sa.Engine, action: str
) -> None:
    seed(db_url, 1, session_state="pausada" if action == "resume" else "activa")
    race = Interleave(
        engine, db_url, ("UPDATE SESIONES_ENVIO",), "UPDATE sesiones_envio SET estado = 'cancelada'"
    )
    target = PAUSADA if action == "pause" else ACTIVA
    with pytest.raises(UsageError, match="cancel"):
        operator.set_session_state(engine, "s1", target)
    race.finish()
    assert race.committed_first
    assert scalar(db_url, "SELECT estado FROM sesiones_envio") == "cancelada"


def test_cancel_never_touches_a_row_fenced_meanwhile(db_url: str, engine: sa.Engine) -> None:
    """Guard: the row a run fences (procesando -> enviando) between cancel's
    look and its write stays on the wire, untouched."""
    [waiting, claimed] = seed(db_url, 2)
    execute(
        db_url, "UPDATE cola_envios SET estado = 'procesando', claim_token = 't' WHERE id = :i", i=claimed
    )
    race = Interleave(
        engine,
        db_url,
        ("UPDATE COLA_ENVIOS",),
        "UPDATE cola_envios SET estado = 'enviando' "
        "WHERE id = :i AND claim_token = 't' AND estado = 'procesando'",
        i=claimed,
    )
    out = operator.cancel(engine, _args(ids=[waiting, claimed]))
    race.finish()
    assert race.committed_first
    table = rows(db_url)
    assert table[claimed]["estado"] == "enviando" and table[claimed]["claim_token"] == "t"
    assert table[waiting]["estado"] == "cancelado" and out["cancelled"] == 1


def test_prune_never_deletes_the_journal_of_a_row_requeued_meanwhile(db_url: str, engine: sa.Engine) -> None:
    """An operator requeues an old `error` row after prune chose it and before
    prune deleted it: either prune wins (row, journal gone; key kept) or the
    requeue does (row and its whole journal stay), never half of each."""
    [row_id] = seed(db_url, 1)
    execute(
        db_url, "UPDATE cola_envios SET estado = 'error', actualizado_at = :t WHERE id = :i", t=OLD, i=row_id
    )
    _attempt(db_url, row_id)
    race = Interleave(
        engine,
        db_url,
        ("INSERT", "UPDATE", "DELETE"),
        "UPDATE cola_envios SET estado = 'pendiente' WHERE id = :i AND estado = 'error'",
        wait=5.0,  # prune may hold the row's lock already (then the requeue waits for it)
        i=row_id,
    )
    operator.prune(engine, older_than_days=30, batch=10)
    race.finish()
    journal = scalar(db_url, "SELECT COUNT(*) FROM intentos_envio WHERE cola_envio_id = :i", i=row_id)
    keys = scalar(db_url, "SELECT COUNT(*) FROM claves_podadas")
    if row_id in rows(db_url):
        assert rows(db_url)[row_id]["estado"] == "pendiente"
        assert (journal, keys) == (1, 0)
    else:
        assert (journal, keys) == (0, 1)


# --- requeue / cancel that match nothing say why ------------------------------


def test_requeue_and_cancel_that_match_nothing_say_why(sqlite_db_url: str, tmp_path: Path) -> None:
    url = sqlite_db_url
    [sent, pending] = seed(url, 2)
    execute(url, "UPDATE cola_envios SET estado = 'enviado' WHERE id = :i", i=sent)
    env = worker_env(url, tmp_path)
    before = rows(url)

    def refused(*argv: str) -> str:
        proc = run_worker(env, *argv)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert rows(url) == before  # nothing written
        return proc.stderr

    assert "id 999 not found" in refused("requeue", "--id", "999")
    err = refused("requeue", "--id", str(sent), "--id", "999")
    assert f"id {sent} is enviado" in err and "id 999 not found" in err
    err = refused("requeue", "--session", "s1")  # default: the session's error rows
    assert "no error row" in err and "1 enviado" in err and "1 pendiente" in err
    err = refused("requeue", "--session", "s1", "--state", "cancelado")
    assert "no cancelado row" in err
    assert "--session: no session named 'nope'" in refused("requeue", "--session", "nope")
    err = refused("cancel", "--id", str(sent))
    assert f"id {sent} is enviado" in err and "pendiente" in err
    assert "id 12345 not found" in refused("cancel", "--id", "12345")
    err = refused("cancel", "--session", "s1", "--state", "procesando")
    assert "no procesando row" in err and "1 pendiente" in err
    # Some ids matched: done (exit 0), the others are named.
    partly = run_worker(env, "cancel", "--id", str(pending), "--id", str(sent))
    assert partly.returncode == 0, partly.stderr
    assert "cancelled 1 row(s)" in partly.stdout and f"id {sent} is enviado" in partly.stdout
    assert rows(url)[pending]["estado"] == "cancelado"


# --- prune never loses a promise -------------------------------------------------

OLD = "2020-01-01 00:00:00"


def _snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                name: sorted(tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {name}")))
                for name in (
                    "cola_envios",
                    "intentos_envio",
                    "envios_whatsapp",
                    "claves_podadas",
                    "sesiones_envio",
                )
            }
    finally:
        engine.dispose()


def test_import_send_prune_import_again_inserts_nothing(
    db_url: str, tmp_path: Path, sandbox: SandboxServer
) -> None:
    source = tmp_path / "citas.csv"
    source.write_text(
        "telefono,mensaje,clave\n"
        + "".join(f"{phone(k)},recordatorio {k},cita-{k}\n" for k in range(3))
        + f"{phone(9)},sin clave propia,\n",
        encoding="utf-8",
    )
    env = worker_env(db_url, tmp_path, provider="fake", fake_base_url=sandbox.base_url)
    first = run_worker(env, "enqueue", "--session", "citas", "--csv", str(source))
    assert first.returncode == 0 and "inserted 4, already queued 0" in first.stdout, first.stderr
    sent = run_worker(env, "run")
    assert sent.returncode == 0, sent.stderr
    assert states(db_url) == Counter({"enviado": 4}) and len(sandbox.ledger()) == 4
    execute(db_url, "UPDATE cola_envios SET actualizado_at = :t", t=OLD)

    pruned = run_worker(env, "prune", "--older-than-days", "30", "--batch", "3")
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 4 finished row(s)" in pruned.stdout
    assert rows(db_url) == {} and scalar(db_url, "SELECT COUNT(*) FROM claves_podadas") == 4

    again = run_worker(env, "enqueue", "--session", "citas", "--csv", str(source))
    assert again.returncode == 0 and "inserted 0, already queued 4" in again.stdout, again.stderr
    assert run_worker(env, "run").returncode == 0
    assert len(sandbox.ledger()) == 4  # nothing sent twice

    # A kept key lasts --keep-keys-days after its row was pruned, then goes.
    execute(db_url, "UPDATE claves_podadas SET podada_at = :t WHERE clave = 'cita-0'", t=OLD)
    forget = run_worker(env, "prune", "--older-than-days", "30", "--keep-keys-days", "400")
    assert forget.returncode == 0 and "forgot 1 dedupe key(s)" in forget.stdout, forget.stdout
    later = run_worker(env, "enqueue", "--session", "citas", "--csv", str(source))
    assert "inserted 1, already queued 3" in later.stdout, later.stderr


def test_prune_keeps_incierto_rows(db_url: str, tmp_path: Path) -> None:
    [unsure, failed] = seed(db_url, 2)
    execute(db_url, "UPDATE cola_envios SET estado = 'incierto' WHERE id = :i", i=unsure)
    execute(db_url, "UPDATE cola_envios SET estado = 'error' WHERE id = :i", i=failed)
    execute(db_url, "UPDATE cola_envios SET actualizado_at = :t", t=OLD)
    _attempt(db_url, unsure)
    proc = run_worker(worker_env(db_url, tmp_path), "prune", "--older-than-days", "1")
    assert proc.returncode == 0, proc.stderr
    assert "pruned 1 finished row(s)" in proc.stdout and "kept 1 incierto" in proc.stdout
    assert list(rows(db_url)) == [unsure]
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio WHERE cola_envio_id = :i", i=unsure) == 1


def test_prune_dry_run_writes_nothing(db_url: str, tmp_path: Path) -> None:
    ids = seed(db_url, 4)
    execute(
        db_url,
        "UPDATE cola_envios SET estado = 'enviado', actualizado_at = :t WHERE id <> :i",
        t=OLD,
        i=ids[0],
    )
    _attempt(db_url, ids[1])
    execute(
        db_url,
        "INSERT INTO claves_podadas (clave, podada_at) VALUES ('old-key', :t), ('new-key', :n)",
        t=OLD,
        n="2099-01-01 00:00:00",
    )
    before = _snapshot(db_url)
    env = worker_env(db_url, tmp_path)
    proc = run_worker(env, "prune", "--older-than-days", "30", "--keep-keys-days", "365", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would prune 3 finished row(s)" in proc.stdout and "1 journal row(s)" in proc.stdout
    assert "would forget 1 dedupe key(s)" in proc.stdout
    assert _snapshot(db_url) == before
    as_json = run_worker(env, "prune", "--older-than-days", "30", "--dry-run", "--json")
    report = json.loads(as_json.stdout)
    assert report["dry_run"] is True and report["rows"] == 3 and report["by_state"] == {"enviado": 3}
    assert _snapshot(db_url) == before


def test_prune_refuses_a_key_horizon_shorter_than_the_pruning_age(sqlite_db_url: str, tmp_path: Path) -> None:
    seed(sqlite_db_url, 1)
    execute(sqlite_db_url, "UPDATE cola_envios SET estado = 'enviado', actualizado_at = :t", t=OLD)
    proc = run_worker(
        worker_env(sqlite_db_url, tmp_path), "prune", "--older-than-days", "30", "--keep-keys-days", "7"
    )
    assert proc.returncode == 2 and "--keep-keys-days" in proc.stderr and "Traceback" not in proc.stderr
    assert len(rows(sqlite_db_url)) == 1
