"""Does `cola-worker receipts` keep up with one worker process?

One run of the bench, one fresh database:

1. live: the sandbox (50 ms latency) posts Meta-shaped status webhooks (sent,
   delivered, read: three per message, one status per request, as Meta
   usually sends them, 64 at a time) to `cola-worker receipts` while one `cola-worker run`
   sends N messages. Prints the run's send rate and how long after the run
   the last status was stored (the receiver's lag);
2. burst: the delivery state is cleared and the bench itself posts the same
   3N signed statuses as fast as it can (200 concurrent requests, aiohttp
   client), so the receiver, not the sender, is the limit: statuses stored
   per second, next to the send rate (three statuses per message).

    .venv/bin/python bench/bench_receipts.py [--backend mysql|postgresql|sqlite] [--n 2000]

Writes bench/results/receipts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
from support import ScratchDatabase, execute, free_port, scalar, seed  # noqa: E402

from worker import db  # noqa: E402
from worker.web.signing import META_HEADER, hmac_sha256_signature  # noqa: E402

SECRET = "bench-app-secret"
BURST = 200  # concurrent requests of the burst (Meta delivers webhooks concurrently)
SERVER_URLS = {
    "mysql": os.environ.get("COLA_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1/test"),
    "postgresql": os.environ.get("COLA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1/test"),
}


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def _stored(url: str) -> int:
    return int(scalar(url, "SELECT COUNT(*) FROM estados_entrega"))


def _meta_body(status: dict[str, Any]) -> bytes:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": "sandbox"},
        "statuses": [status],
    }
    change = {"field": "messages", "value": value}
    payload = {"object": "whatsapp_business_account", "entry": [{"changes": [change]}]}
    return json.dumps(payload, separators=(",", ":")).encode()


async def _burst(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, int]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    refused = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal refused
        while not queue.empty():
            body = queue.get_nowait()
            headers = {"Content-Type": "application/json", META_HEADER: hmac_sha256_signature(SECRET, body)}
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    refused += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.monotonic() - started, refused


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="mysql", choices=["mysql", "postgresql", "sqlite"])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=32, help="the run's --concurrency")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        database = ScratchDatabase(args.backend, SERVER_URLS.get(args.backend), tmp, prefix="cola_bench_")
        engine = db.create_engine(database.url)
        db.upgrade(engine)
        engine.dispose()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            seed(database.url, args.n)
            env = {k: v for k, v in os.environ.items() if not k.startswith("COLA_")}
            recv_port, sandbox_port = free_port(), free_port()
            env.update(
                COLA_DATABASE_URL=database.url,
                COLA_PROVIDER="fake",
                COLA_FAKE_BASE_URL=f"http://127.0.0.1:{sandbox_port}",
                COLA_RATE_LIMIT="100000",
                COLA_PAIR_INTERVAL="0",
                COLA_MAX_JOBS="0",
                COLA_CONCURRENCY=str(args.concurrency),
                COLA_LOG_LEVEL="WARNING",
                COLA_LOCK_FILE=str(tmp / "run.lock"),
                COLA_META_APP_SECRET=SECRET,
                COLA_RECEIPTS_PORT=str(recv_port),
            )
            procs.append(subprocess.Popen([sys.executable, "-m", "worker", "receipts"], env=env, cwd=ROOT))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "worker",
                        "fake-provider",
                        f"--port={sandbox_port}",
                        f"--latency-ms={args.latency_ms}",
                        f"--receipts-url=http://127.0.0.1:{recv_port}/meta",
                        f"--receipts-secret={SECRET}",
                        "--receipts-batch=1",
                        "--receipts-senders=64",
                        "--receipts-delay-ms=0",
                    ],
                    env=env,
                    cwd=ROOT,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_port(recv_port)
            _wait_port(sandbox_port)

            # 1. live: one run, statuses flowing at the same time.
            started = time.monotonic()
            code = subprocess.run([sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT).returncode
            run_seconds = time.monotonic() - started
            assert code == 0, code
            expected = 3 * args.n
            while _stored(database.url) < expected:
                if time.monotonic() - started > 600:
                    raise SystemExit(f"only {_stored(database.url)} of {expected} statuses stored")
                time.sleep(0.05)
            all_stored = time.monotonic() - started
            send_rate = args.n / run_seconds
            live = {
                "statuses": expected,
                "seconds_until_all_stored": round(all_stored, 2),
                "lag_after_run_seconds": round(all_stored - run_seconds, 2),
                "statuses_per_second": round(expected / all_stored, 1),
            }

            # 2. burst: the same statuses again, as fast as the bench can post them.
            reader = db.create_engine(database.url)
            with reader.connect() as conn:
                rows = [
                    (int(r[0]), str(r[1]), str(r[2]))
                    for r in conn.exec_driver_sql("SELECT id, proveedor_msg_id, telefono FROM cola_envios")
                ]
            reader.dispose()
            execute(database.url, "DELETE FROM estados_entrega")
            execute(
                database.url,
                "UPDATE cola_envios SET entrega_estado=NULL, entrega_enviado_at=NULL, "
                "entrega_entregado_at=NULL, entrega_leido_at=NULL",
            )
            now = str(int(time.time()))
            bodies = [
                _meta_body(
                    {
                        "id": mid,
                        "status": word,
                        "timestamp": now,
                        "recipient_id": phone.lstrip("+"),
                        "biz_opaque_callback_data": str(job),
                    }
                )
                for word in ("sent", "delivered", "read")
                for job, mid, phone in rows
            ]
            seconds, refused = asyncio.run(_burst(f"http://127.0.0.1:{recv_port}/meta", bodies, BURST))
            stored = _stored(database.url)
            assert refused == 0 and stored == expected, (refused, stored)
            burst = {
                "statuses": expected,
                "seconds": round(seconds, 2),
                "statuses_per_second": round(expected / seconds, 1),
                "messages_per_second_equivalent": round(expected / seconds / 3, 1),
                "concurrent_requests": BURST,
            }
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
            database.drop()

    print(f"{args.backend}: one run sent {args.n} messages at {send_rate:.1f} msg/s ({run_seconds:.1f} s)")
    print(
        f"{args.backend}: live, {expected} statuses all stored "
        f"{live['lag_after_run_seconds']} s after the run ended "
        f"({live['statuses_per_second']} statuses/s overall)"
    )
    print(
        f"{args.backend}: burst, {burst['statuses_per_second']} statuses/s "
        f"= {burst['messages_per_second_equivalent']} messages/s at three statuses each "
        f"(vs {send_rate:.1f} msg/s sent)"
    )
    out = ROOT / "bench" / "results" / "receipts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "receipts ingest vs one worker's send rate",
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "backend": args.backend,
                "messages": args.n,
                "sandbox_latency_ms": args.latency_ms,
                "run_concurrency": args.concurrency,
                "send_messages_per_second": round(send_rate, 1),
                "live": live,
                "burst": burst,
                "keeps_up": burst["messages_per_second_equivalent"] >= send_rate,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
