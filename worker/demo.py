"""`cola-worker demo`: the whole story on an embedded SQLite database (or, with
``--database-url``, on an empty MariaDB/MySQL or PostgreSQL database, where
the overlapping runs really claim side by side with ``SKIP LOCKED``) and the
local sandbox, with the real commands in real processes: migrate, a bad import
refused whole, an import (and the same import again), the incident's
overlapping runs, status, audit, and the sandbox's own count of what it got."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worker.errors import UsageError
from worker.sandbox import SandboxOptions, SandboxServer
from worker.settings import Settings

NAMES = ["Ana", "Bruno", "Carla", "Diego", "Elena", "Fabio", "Gina", "Hugo", "Irene", "Jorge"]


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _cola(env: dict[str, str], *args: str, show: bool = True) -> subprocess.CompletedProcess[str]:
    if show:
        print("$ cola-worker " + " ".join(args), flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=600
    )
    if show:
        for line in (proc.stdout + proc.stderr).rstrip().splitlines():
            print("    " + line)
        print(f"    (exit {proc.returncode})", flush=True)
    return proc


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["cliente_id", "cliente_nombre", "telefono", "mensaje"])
        writer.writeheader()
        writer.writerows(rows)


def command_demo(args: argparse.Namespace, settings: Settings) -> int:
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cola-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    locks = workdir / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    os.chmod(locks, 0o700)
    if args.database_url:
        database_url = args.database_url
        backend = _require_empty(database_url)
    else:
        db_path = workdir / "cola.db"
        if db_path.exists():
            db_path.unlink()
        database_url, backend = f"sqlite:///{db_path}", "sqlite"
    n = max(1, args.messages)
    sandbox = SandboxServer(
        SandboxOptions(
            port=0, latency_ms=40, jitter_ms=20, ledger=str(workdir / "ledger.jsonl"), rate_limit=100
        )
    )
    base_url = sandbox.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
    env.update(
        {
            "COLA_DATABASE_URL": database_url,
            "COLA_PROVIDER": "fake",
            "COLA_FAKE_BASE_URL": base_url,
            "COLA_DEFAULT_REGION": "PE",
            "COLA_RATE_LIMIT": "40",
            "COLA_PAIR_INTERVAL": "6",
            "COLA_LOG_FORMAT": settings.log_format,
            "PYTHONUNBUFFERED": "1",
        }
    )
    try:
        print(f"demo directory: {workdir}\nsandbox (fake WhatsApp Cloud API): {base_url}")
        print(
            f"database: {backend}" + (" (embedded file)" if backend == "sqlite" else " (an empty database)")
        )

        _say("1. Create the schema (Alembic)")
        _cola(env, "db", "upgrade")

        _say("2. A file with bad rows is refused whole: every bad line named, nothing written")
        bad = workdir / "bad.csv"
        _write_csv(
            bad,
            [
                {"cliente_id": "1", "cliente_nombre": "Ana", "telefono": "987654321", "mensaje": "Hola Ana"},
                {"cliente_id": "2", "cliente_nombre": "Bruno", "telefono": "12", "mensaje": "Hola Bruno"},
                {"cliente_id": "3", "cliente_nombre": "Carla", "telefono": "987654322", "mensaje": ""},
            ],
        )
        _cola(env, "enqueue", "--session", "recordatorios", "--csv", str(bad))

        _say(f"3. Queue {n} reminders; the same file again inserts nothing twice")
        good = workdir / "recordatorios.csv"
        _write_csv(
            good,
            [
                {
                    "cliente_id": f"C{i:04d}",
                    "cliente_nombre": f"{NAMES[i % len(NAMES)]} {i}",
                    "telefono": f"9{87000000 + i:08d}",
                    "mensaje": f"Hola, le recordamos su cita de mañana (ref {i}).",
                }
                for i in range(n)
            ],
        )
        _cola(env, "enqueue", "--session", "recordatorios", "--csv", str(good))
        _cola(env, "enqueue", "--session", "recordatorios", "--csv", str(good))

        _say("4. The incident, replayed: cron on host A twice plus a manual run, and host B, all at once")
        print("   host A's three runs share one lock file; host B has its own (another machine)")
        if backend == "sqlite":
            print("   (SQLite serialises writes: the conditional UPDATE proves each claim)")
        else:
            print("   (the runs claim side by side: SELECT ... FOR UPDATE SKIP LOCKED gives each other rows)")
        procs = []
        for name, lock in (("A cron", "a"), ("A cron+1", "a"), ("A manual", "a"), ("B cron", "b")):
            run_env = dict(env, COLA_LOCK_FILE=str(locks / f"host-{lock}.lock"))
            procs.append(
                (
                    name,
                    subprocess.Popen(
                        [sys.executable, "-m", "worker", "run", "--batch-size", "5", "--concurrency", "8"],
                        env=run_env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    ),
                )
            )
            time.sleep(0.05)
        for name, proc in procs:
            out, _ = proc.communicate(timeout=600)
            lines = out.rstrip().splitlines()
            print(f"  [{name}] exit {proc.returncode}")
            shown = (
                lines if len(lines) <= 4 else [*lines[:2], f"... {len(lines) - 3} more lines ...", lines[-1]]
            )
            for line in shown:
                print("      " + line)

        _say(
            "5. A minute later cron runs again: each run claims at most --max-jobs (50), so the rest goes now"
        )
        while True:
            again = _cola(dict(env, COLA_LOCK_FILE=str(locks / "host-a.lock")), "run", show=False)
            last = (again.stdout + again.stderr).rstrip().splitlines()[-1:]
            print("    " + (last[0] if last else f"exit {again.returncode}"))
            if again.returncode != 0 or " claimed 0," in (last[0] if last else " claimed 0,"):
                break

        _say("6. Status")
        _cola(env, "status")

        _say("7. The duplicate audit")
        audit = _cola(env, "audit")

        _say("8. What the sandbox received (its own ledger)")
        stats = sandbox.stats()
        print(f"    accepted {stats['accepted']} message(s), duplicates: {len(stats['duplicates'])}")
        print(f"    ledger: {workdir / 'ledger.jsonl'}")
        ok = audit.returncode == 0 and not stats["duplicates"] and stats["accepted"] == n
        print("\nEvery message was sent exactly once." if ok else "\nSomething is wrong: see above.")
        return 0 if ok else 1
    finally:
        sandbox.stop()


def _require_empty(url: str) -> str:
    """The backend name, after checking the database holds no table at all:
    the demo fills it, so it never runs on a database that holds anything."""
    import sqlalchemy as sa

    from worker import db

    engine = db.create_engine(url)
    try:
        try:
            with engine.connect() as conn:
                tables = sa.inspect(conn).get_table_names()
        except Exception as exc:
            raise db.translate_error(exc) from exc
        if tables:
            raise UsageError(
                f"--database-url: the database is not empty ({len(tables)} table(s), "
                f"e.g. {sorted(tables)[0]}); give an empty database: the demo fills its own tables"
            )
        return "mysql" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name
    finally:
        engine.dispose()
