"""How fast one `cola-worker run` drains the queue, by --concurrency.

One run, one process, against the sandbox (its own process, 50 ms latency)
and a fresh database per case. Distinct recipients; rate and pair limits
lifted (docs/design.md section 7). The concurrency-1 baseline uses a small N.
Also: 4 runs at once (separate lock files) to show the claims scale out.

    .venv/bin/python bench/bench_run.py [--backend mysql|postgresql|sqlite] [--n 2000]

Prints messages/s per case and writes bench/results/run.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import ScratchDatabase, free_port, seed, states  # noqa: E402

from worker import db  # noqa: E402

SERVER_URLS = {
    "mysql": os.environ.get("COLA_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1/test"),
    "postgresql": os.environ.get("COLA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"),
}


def fresh_database(backend: str, tmp: Path) -> ScratchDatabase:
    database = ScratchDatabase(backend, SERVER_URLS.get(backend), tmp, prefix="cola_bench_")
    engine = db.create_engine(database.url)
    db.upgrade(engine)
    engine.dispose()
    return database


def run_case(
    backend: str, sandbox_url: str, n: int, concurrency: int, runs: int, tmp: Path
) -> dict[str, object]:
    database = fresh_database(backend, tmp)
    try:
        seed(database.url, n)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
        env.update(
            COLA_DATABASE_URL=database.url,
            COLA_PROVIDER="fake",
            COLA_FAKE_BASE_URL=sandbox_url,
            COLA_RATE_LIMIT="100000",
            COLA_PAIR_INTERVAL="0",
            COLA_MAX_JOBS="0",
            COLA_CONCURRENCY=str(concurrency),
            COLA_BATCH_SIZE=str(max(50, concurrency * 2)),
            COLA_LOG_LEVEL="WARNING",
        )
        locks = tmp / "locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "worker", "run"],
                env=dict(env, COLA_LOCK_FILE=str(locks / f"{uuid.uuid4().hex}.lock")),
                cwd=ROOT,
            )
            for _ in range(runs)
        ]
        codes = [p.wait(timeout=900) for p in procs]
        elapsed = time.monotonic() - started
        final = states(database.url)
        assert codes == [0] * runs, codes
        assert final == {"enviado": n}, final
        return {
            "backend": backend,
            "runs": runs,
            "concurrency": concurrency,
            "messages": n,
            "seconds": round(elapsed, 2),
            "messages_per_second": round(n / elapsed, 1),
        }
    finally:
        database.drop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="mysql", choices=["mysql", "postgresql", "sqlite"])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=50)
    args = parser.parse_args()
    port = free_port()
    sandbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "fake-provider",
            "--port",
            str(port),
            "--latency-ms",
            str(args.latency_ms),
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    sandbox_url = f"http://127.0.0.1:{port}"
    results = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        with tempfile.TemporaryDirectory() as tmp:
            cases = [
                (200, 1, 1),
                (args.n, 4, 1),
                (args.n, 16, 1),
                (args.n, 32, 1),
                (args.n, 64, 1),
                (args.n, 16, 4),
            ]
            for n, concurrency, runs in cases:
                result = run_case(args.backend, sandbox_url, n, concurrency, runs, Path(tmp))
                results.append(result)
                print(
                    f"{args.backend:10s} runs={runs} concurrency={concurrency:3d} n={n:5d}: "
                    f"{result['messages_per_second']:8.1f} msg/s ({result['seconds']} s)",
                    flush=True,
                )
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)
    base = results[0]["messages_per_second"]
    for r in results:
        r["speedup_vs_concurrency_1"] = round(float(r["messages_per_second"]) / float(base), 1)  # type: ignore[arg-type]
    out = ROOT / "bench" / "results" / f"run-{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "run throughput by concurrency",
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "sandbox_latency_ms": args.latency_ms,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
