"""How fast is the sandbox itself? (so benchmarks of the worker know when they
measure the worker and when they measure the sandbox)

The sandbox runs as its own process (``python -m worker.sandbox``, as
``cola-worker fake-provider`` would), on 127.0.0.1 with a free port. For each
latency (0 and 50 ms) and each client thread count (16 and 64), the client
threads share one ``fake`` provider (one ``httpx.Client``, pool = threads) and
send for a few seconds to distinct recipients. The server's CPU time (from
/proc) tells whether the server or the client was the bottleneck: one fully
busy core (~1.0 CPU s per s) means the server's GIL is the ceiling.

Writes bench/results/sandbox.json. Takes about 30 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.providers.base import Accepted, SendRequest  # noqa: E402
from worker.providers.meta import FakeProvider  # noqa: E402
from worker.settings import load_settings  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sandbox.json"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_sandbox(latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox", "--port", "0", "--latency-ms", str(latency_ms)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    for _ in range(10):
        line = proc.stderr.readline()
        if "listening on" in line:
            return proc, line.rsplit(" ", 1)[-1].strip()
    proc.kill()
    raise RuntimeError("the sandbox did not start")


def stop_sandbox(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def client_load(url: str, threads: int, seconds: float, start_at: float) -> dict[str, Any]:
    """N threads sharing one fake provider send from ``start_at`` (wall clock)
    for ``seconds``; returns every latency and the failure count."""
    settings = load_settings(environ={"COLA_FAKE_BASE_URL": url, "COLA_READ_TIMEOUT": "10"})
    provider = FakeProvider.from_settings(settings, max_connections=threads)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    tag = f"{os.getpid() % 1000:03d}"
    deadline = time.perf_counter() + max(0.0, start_at - time.time()) + seconds

    def client(k: int) -> None:
        time.sleep(max(0.0, start_at - time.time()))
        i = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            result = provider.send(
                SendRequest(
                    job_id=f"{tag}-{k}-{i}",
                    to=f"+5{tag}{k:03d}{i:06d}",
                    sender=None,
                    kind="text",
                    text="bench",
                )
            )
            latencies[k].append(time.perf_counter() - t0)
            if not isinstance(result, Accepted):
                failures[k] += 1
            i += 1

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    provider.close()
    return {"latencies": [x for per in latencies for x in per], "failures": sum(failures)}


def run_case(url: str, pid: int, threads: int, seconds: float, processes: int) -> dict[str, Any]:
    start_at = time.time() + (1.5 if processes > 1 else 0.2)  # let client processes import first
    procs = []
    if processes > 1:
        per = threads // processes
        for _ in range(processes):
            cmd = [sys.executable, __file__, "--client", url, str(per), str(seconds), repr(start_at)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    time.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    if processes > 1:
        parts = [json.loads(p.communicate()[0]) for p in procs]
    else:
        parts = [client_load(url, threads, seconds, start_at)]
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(pid)
    flat = sorted(x for part in parts for x in part["latencies"])
    done = len(flat)
    return {
        "threads": threads,
        "client_processes": processes,
        "seconds": round(elapsed, 3),
        "requests": done,
        "failures": sum(part["failures"] for part in parts),
        "requests_per_second": round(done / elapsed, 1),
        "latency_ms_p50": round(statistics.median(flat) * 1000, 2) if flat else None,
        "latency_ms_p99": round(flat[int(0.99 * (done - 1))] * 1000, 2) if flat else None,
        "server_cpu_seconds_per_second": round((cpu1 - cpu0) / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per case")
    parser.add_argument("--threads", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="client processes")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--client", nargs=4, metavar=("URL", "THREADS", "SECONDS", "START_AT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.client:
        url, threads, seconds, start_at = args.client
        print(json.dumps(client_load(url, int(threads), float(seconds), float(start_at))))
        return 0

    cases = []
    for latency in args.latency_ms:
        proc, url = start_sandbox(latency)
        try:
            for threads, processes in [(t, p) for p in args.processes for t in args.threads]:
                row = {"latency_ms": latency, **run_case(url, proc.pid, threads, args.seconds, processes)}
                ceiling = threads / (latency / 1000) if latency else None
                row["ideal_requests_per_second"] = round(ceiling, 1) if ceiling else None
                cases.append(row)
                print(
                    f"latency {latency:>4.0f} ms  threads {threads:>3} in {processes} process(es): "
                    f"{row['requests_per_second']:>7.1f} req/s"
                    + (f" (ideal {ceiling:.0f})" if ceiling else "")
                    + f"  p50 {row['latency_ms_p50']} ms  p99 {row['latency_ms_p99']} ms"
                    f"  failures {row['failures']}  server CPU {row['server_cpu_seconds_per_second']} s/s",
                    flush=True,
                )
        finally:
            stop_sandbox(proc)

    result = {
        "benchmark": "sandbox",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "server": "worker.sandbox (http.server.ThreadingHTTPServer, HTTP/1.1 keep-alive), own process",
        "client": "per client process one fake provider (httpx.Client, pool = its threads) shared by "
        "its threads; threads are split evenly over the client processes; same host",
        "cases": cases,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.output)
    print(f"written to {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
