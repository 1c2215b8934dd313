"""G4: how long does a second `cola-worker run` take when another run holds
the lock? (It must exit 0 "at once": well under half a second.)

A background process takes the lock (``worker.lock.acquire``) and keeps it.
The installed console script ``cola-worker run`` is then started 10 times with
the same ``COLA_LOCK_FILE`` and a bogus ``COLA_DATABASE_URL`` (a run that got
as far as the database would fail on it); each whole process is timed from
spawn to exit. For comparison, in the same run: ``python -c "import
sqlalchemy, httpx"`` (the heavy imports the lock fast path avoids) and
``python -c pass`` (the interpreter alone).

Writes bench/results/lock.json. Exits 1 when a run misbehaves or the median
misses the 0.5 s target. Takes a few seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lock.json"
TARGET_MEDIAN_S = 0.5
BOGUS_DB_URL = "mysql+pymysql://bench:not-used@192.0.2.1:1/never"  # TEST-NET: never reachable

HOLDER = textwrap.dedent(
    """
    import sys, time
    from worker import lock
    got = lock.acquire(sys.argv[1])
    assert isinstance(got, lock.FileLock), got
    print("held", flush=True)
    time.sleep(600)
    """
)


def console_script() -> Path:
    for candidate in (Path(sys.executable).parent / "cola-worker", ROOT / ".venv" / "bin" / "cola-worker"):
        if candidate.exists():
            return candidate
    raise SystemExit("the cola-worker console script is not installed (pip install -e .)")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    return time.perf_counter() - t0, proc


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/lock.json")
    args = parser.parse_args()

    exe = console_script()
    python = exe.parent / "python"
    python_cmd = str(python) if python.exists() else sys.executable
    failures: list[str] = []

    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp:
        lock_dir = Path(tmp) / "locks"
        lock_dir.mkdir(mode=0o700)
        lock_file = lock_dir / "run.lock"
        holder = subprocess.Popen(
            [python_cmd, "-c", HOLDER, str(lock_file)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            assert holder.stdout is not None
            if holder.stdout.readline().strip() != "held":
                raise SystemExit("the holder process did not take the lock")
            env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
            env.update({"COLA_LOCK_FILE": str(lock_file), "COLA_DATABASE_URL": BOGUS_DB_URL})

            timed([str(exe), "run"], env)  # warm the page cache; not counted
            run_times: list[float] = []
            for k in range(args.runs):
                elapsed, proc = timed([str(exe), "run"], env)
                run_times.append(elapsed)
                if proc.returncode != 0:
                    failures.append(f"run {k}: exit {proc.returncode}: {proc.stderr.strip()}")
                elif (
                    "another run holds the lock" not in proc.stderr or f"pid {holder.pid}" not in proc.stderr
                ):
                    failures.append(f"run {k}: the holder (pid {holder.pid}) was not named: {proc.stderr!r}")

            heavy_times: list[float] = []
            bare_times: list[float] = []
            for _ in range(args.runs):
                elapsed, proc = timed([python_cmd, "-c", "import sqlalchemy, httpx"], env)
                if proc.returncode != 0:
                    failures.append(f"import sqlalchemy, httpx failed: {proc.stderr.strip()}")
                heavy_times.append(elapsed)
                elapsed, _ = timed([python_cmd, "-c", "pass"], env)
                bare_times.append(elapsed)
        finally:
            try:
                os.killpg(holder.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            holder.wait(timeout=10)
            if holder.stdout is not None:
                holder.stdout.close()

    refused = summary(run_times)
    heavy = summary(heavy_times)
    bare = summary(bare_times)
    met = refused["median_s"] < TARGET_MEDIAN_S
    print(f"cola-worker run, lock held ({args.runs} runs, whole process):")
    print(
        f"  median {refused['median_s']:.3f} s   min {refused['min_s']:.3f} s   max {refused['max_s']:.3f} s"
    )
    print(f"python -c 'import sqlalchemy, httpx' ({args.runs} runs):")
    print(f"  median {heavy['median_s']:.3f} s   min {heavy['min_s']:.3f} s   max {heavy['max_s']:.3f} s")
    print(f"python -c pass: median {bare['median_s']:.3f} s")
    print(f"target: median under {TARGET_MEDIAN_S} s: {'met' if met else 'MISSED'}")

    result: dict[str, Any] = {
        "benchmark": "lock",
        "guarantee": "G4: a second run on the same host exits 0 at once, naming the holder",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "command": (
            "cola-worker run (console script), COLA_LOCK_FILE held by another process, "
            "bogus COLA_DATABASE_URL"
        ),
        "runs": args.runs,
        "refused_run": {**refused, "all_s": [round(t, 4) for t in run_times]},
        "import_sqlalchemy_httpx": {**heavy, "all_s": [round(t, 4) for t in heavy_times]},
        "python_pass": bare,
        "target_median_s": TARGET_MEDIAN_S,
        "target_met": met,
        "failures": failures,
    }
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 0 if met and not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
