"""Receipts settle ambiguous sends, with real processes: `cola-worker receipts`,
the sandbox posting signed status webhooks (failed, duplicated, reordered and
late ones among them), and a run against faults that leave rows `incierto`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
from support import (
    free_port,
    kill_group,
    phone,
    rows,
    run_worker,
    scalar,
    seed,
    start_worker,
    wait_until,
    worker_env,
)

SECRET = "e2e-app-secret"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_receipts_settle_every_accepted_ambiguous_row_and_nothing_else(db_url: str, tmp_path: Path) -> None:
    n = 30
    ids = seed(db_url, n)
    job_of = {phone(k): ids[k] for k in range(n)}
    faults = {
        **{phone(k): "reset-after" for k in range(0, 4)},  # accepted, then the connection is reset
        **{phone(k): "fail-after" for k in range(4, 8)},  # accepted, then 500 without a Meta body
        **{phone(k): "reset-before" for k in range(8, 12)},  # reset before accepting: never sent
    }
    accepted_ambiguous = {job_of[p] for p, kind in faults.items() if kind != "reset-before"}
    never_accepted = {job_of[p] for p, kind in faults.items() if kind == "reset-before"}

    recv_port, sandbox_port = free_port(), free_port()
    env = worker_env(
        db_url,
        tmp_path,
        provider="fake",
        fake_base_url=f"http://127.0.0.1:{sandbox_port}",
        max_jobs=0,
        concurrency=8,
        meta_app_secret=SECRET,
        receipts_port=recv_port,
        receipt_sweep=0.2,
    )
    receipts = start_worker(env, "receipts", log=tmp_path / "receipts.log")
    sandbox_args = [
        "fake-provider",
        f"--port={sandbox_port}",
        "--seed=7",
        *(f"--fault={p}={kind}" for p, kind in faults.items()),
        f"--receipts-url=http://127.0.0.1:{recv_port}/meta",
        f"--receipts-secret={SECRET}",
        "--receipts-failed=0.2",
        "--receipts-duplicate=0.3",
        "--receipts-reorder=0.3",
        "--receipts-late=0.2",
        "--receipts-late-ms=1500",
    ]
    sandbox = start_worker(env, *sandbox_args, log=tmp_path / "sandbox.log")
    base = f"http://127.0.0.1:{sandbox_port}/_sandbox"
    try:
        assert wait_until(lambda: _healthy(f"http://127.0.0.1:{recv_port}/healthz"), timeout=60), (
            tmp_path / "receipts.log"
        ).read_text()
        assert wait_until(lambda: _healthy(base + "/health"), timeout=60)

        result = run_worker(env, "run", timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        ambiguous = scalar(db_url, "SELECT COUNT(*) FROM intentos_envio WHERE resultado='ambiguous'")
        assert ambiguous == len(faults)  # the run saw 12 ambiguous answers

        def settled() -> bool:
            stats = httpx.get(base + "/stats", timeout=5).json()
            table = rows(db_url)
            return stats["receipts"]["pending"] == 0 and all(
                table[j]["estado"] == "enviado" and table[j]["entrega_estado"] in ("read", "failed")
                for j in set(ids) - never_accepted
            )

        assert wait_until(settled, timeout=90, interval=0.3), httpx.get(base + "/stats").json()
        stats = httpx.get(base + "/stats", timeout=5).json()
        ledger = httpx.get(base + "/ledger", timeout=5).json()["messages"]
        metrics = httpx.get(f"http://127.0.0.1:{recv_port}/metrics", timeout=5).text
    finally:
        kill_group(receipts, signal.SIGTERM)
        kill_group(sandbox, signal.SIGTERM)
        receipts.wait(30)
        sandbox.wait(30)

    table = rows(db_url)
    # Nothing sent twice: the sandbox accepted every job at most once.
    assert stats["duplicates"] == {}
    assert sorted(int(m["job_id"]) for m in ledger) == sorted(set(ids) - never_accepted)
    # Every accepted-but-ambiguous row ended enviado, with the sandbox's message id.
    message_of = {int(m["job_id"]): m["message_id"] for m in ledger}
    for job in accepted_ambiguous:
        assert table[job]["estado"] == "enviado", table[job]
        assert table[job]["proveedor_msg_id"] == message_of[job]
    # Rows the sandbox never accepted stay incierto.
    assert {j for j, r in table.items() if r["estado"] == "incierto"} == never_accepted
    # One accepted-send row per sent job; one receipt journal row per settled row.
    assert scalar(db_url, "SELECT COUNT(*) FROM envios_whatsapp") == n - len(never_accepted)
    assert scalar(db_url, "SELECT COUNT(DISTINCT cola_envio_id) FROM envios_whatsapp") == n - len(
        never_accepted
    )
    assert scalar(db_url, "SELECT COUNT(*) FROM intentos_envio WHERE origen='receipt'") == len(
        accepted_ambiguous
    )
    # Each status stored once: 3 per delivered message, 2 per failed one.
    for job in set(ids) - never_accepted:
        expected = 2 if table[job]["entrega_estado"] == "failed" else 3
        got = scalar(db_url, "SELECT COUNT(*) FROM estados_entrega WHERE cola_envio_id=:j", j=job)
        assert got == expected, (job, table[job]["entrega_estado"], got)
        if table[job]["entrega_estado"] == "failed":
            assert table[job]["entrega_codigo"] in ("131026", "131049")
    assert 'cola_receipts_statuses_total{result="duplicate"}' in metrics
    dup_line = next(
        x for x in metrics.splitlines() if x.startswith('cola_receipts_statuses_total{result="duplicate"}')
    )
    assert float(dup_line.split()[-1]) > 0
    assert stats["receipts"]["delivered"] >= stats["receipts"]["scheduled"]

    audit = run_worker(env, "audit", "--json")
    assert audit.returncode == 0, audit.stdout
    status = json.loads(run_worker(env, "status", "--json", "--receipt-window", "0").stdout)
    assert {r["id"] for r in status["incierto_without_receipt"]["rows"]} == never_accepted
