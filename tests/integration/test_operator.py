"""Operator actions: requeue (incierto needs --accept-duplicate-risk), cancel,
pause/resume, prune; each refuses without writing anything."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from support import execute, rows, run_worker, scalar, seed, states, worker_env


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
