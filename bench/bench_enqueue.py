"""Time importing 10,000 CSV rows (one transaction) into SQLite, MariaDB/MySQL and PostgreSQL.

Each backend gets a fresh database created here and dropped afterwards. Prints
rows/s (median of --repeat imports) and the peak Python memory of one more
import traced with tracemalloc (timed apart: tracing slows it down), and writes
bench/results/enqueue.json.

    COLA_TEST_MYSQL_URL=mysql+pymysql://root@127.0.0.1/test \\
    COLA_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1/test \\
    .venv/bin/python bench/bench_enqueue.py [--rows 10000] [--repeat 3]

The import is timed end to end as the CLI does it: parse the CSV, validate
every row (phonenumbers), read the database clock, insert in one transaction.
Validation alone is timed too, so the database's share is visible.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import ScratchDatabase

from worker import db
from worker.importer import import_rows, read_csv, validate_rows
from worker.schema import cola_envios
from worker.settings import load_settings

RESULTS = Path(__file__).resolve().parent / "results" / "enqueue.json"


def make_csv(n: int) -> str:
    lines = ["cliente_id,cliente_nombre,telefono,mensaje,plantilla,idioma,parametros"]
    for i in range(n):
        phone = f"+5198{i:07d}"
        if i % 2:
            lines.append(f"c{i},Cliente {i},{phone},,recordatorio_cita,es_PE,Cliente {i}|lunes 10:00")
        else:
            lines.append(f'c{i},Cliente {i},{phone},"Hola Cliente {i}, su cita es el lunes a las 10:00.",,,')
    return "\n".join(lines) + "\n"


def one_import(url: str, csv_text: str, n: int, *, trace_memory: bool) -> dict[str, Any]:
    """One import into a fresh database. With ``trace_memory`` only the peak
    is meaningful: tracemalloc slows the import down several times."""
    engine = db.create_engine(url)
    try:
        db.upgrade(engine)
        settings = load_settings(environ={"COLA_DATABASE_URL": url})
        if trace_memory:
            tracemalloc.start()
        started = time.perf_counter()
        rows, errors = read_csv(io.StringIO(csv_text, newline=""))
        result = import_rows("bench", rows, engine=engine, settings=settings, read_errors=errors)
        elapsed = time.perf_counter() - started
        peak = 0
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert result.inserted == n, result
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(cola_envios)).scalar_one() == n
        # The same file again: every key already queued (the dedupe pre-select path).
        started = time.perf_counter()
        again = import_rows("bench", rows, engine=engine, settings=settings)
        elapsed_again = time.perf_counter() - started
        assert again.inserted == 0 and again.already_queued == n
        return {"seconds": elapsed, "peak_bytes": peak, "reimport_seconds": elapsed_again}
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="fresh database per repeat; median reported")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    servers = {
        "sqlite": "sqlite",
        "mysql": os.environ.get("COLA_TEST_MYSQL_URL"),
        "postgresql": os.environ.get("COLA_TEST_POSTGRES_URL"),
    }
    csv_text = make_csv(args.rows)

    rows, _ = read_csv(io.StringIO(csv_text, newline=""))
    started = time.perf_counter()
    validate_rows(rows, session="bench", default_region=None, now=dt.datetime(2000, 1, 1))
    validate_seconds = time.perf_counter() - started
    print(f"parse+validate only: {args.rows / validate_seconds:,.0f} rows/s ({validate_seconds:.3f} s)")

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cola_bench_") as tmp:
        for backend, server in servers.items():
            if server is None:
                print(
                    f"{backend}: skipped (set COLA_TEST_{'MYSQL' if backend == 'mysql' else 'POSTGRES'}_URL)"
                )
                continue
            runs = []
            version = None
            for i in range(args.repeat + 1):  # the last pass only measures memory
                fresh = ScratchDatabase(backend, server, Path(tmp), prefix="cola_bench_")
                try:
                    if version is None and backend != "sqlite":
                        eng = db.create_engine(fresh.url)
                        with eng.connect() as conn:
                            version = ".".join(str(v) for v in (conn.dialect.server_version_info or ()))
                        eng.dispose()
                    runs.append(one_import(fresh.url, csv_text, args.rows, trace_memory=i == args.repeat))
                finally:
                    fresh.drop()
            peak = runs.pop()["peak_bytes"]
            seconds = statistics.median(r["seconds"] for r in runs)
            again = statistics.median(r["reimport_seconds"] for r in runs)
            results[backend] = {
                "server_version": version or sqlite3.sqlite_version,
                "rows": args.rows,
                "repeats": args.repeat,
                "median_seconds": round(seconds, 3),
                "rows_per_second": round(args.rows / seconds),
                "reimport_median_seconds": round(again, 3),
                "reimport_rows_per_second": round(args.rows / again),
                "peak_python_memory_mib": round(peak / 2**20, 1),
                "all_seconds": [round(r["seconds"], 3) for r in runs],
            }
            r = results[backend]
            print(
                f"{backend:10s} {r['rows_per_second']:>7,} rows/s  median {r['median_seconds']:.2f} s  "
                f"re-import {r['reimport_rows_per_second']:>7,} rows/s  "
                f"peak {r['peak_python_memory_mib']} MiB"
            )

    max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "benchmark": "enqueue",
        "rows": args.rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "parse_validate_rows_per_second": round(args.rows / validate_seconds),
        "process_max_rss_mib": round(max_rss_kib / 1024, 1),
        "backends": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"process max RSS {report['process_max_rss_mib']} MiB; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
