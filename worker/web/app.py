"""The aiohttp application: ``/healthz``, ``/metrics`` and the routers
(receipts today, the console later), and ``cola-worker receipts``.

Writes are group commits (docs/design.md section 7): each request puts its
statuses on a queue and waits; one writer task takes everything waiting, stores
it in one transaction (in a thread: the repository is synchronous SQLAlchemy)
and wakes the requests, which only then answer 200. So an acknowledged status
is durable, and a burst of callbacks costs a few transactions, not one each.
A sweep task settles ``incierto`` rows whose status arrived before the run
recorded them (:meth:`worker.delivery.DeliveryRepository.sweep`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from worker import db
from worker.delivery import DeliveryRepository, InboundMessage, IngestResult, StatusEvent, parse_words
from worker.errors import ConfigError
from worker.settings import Settings
from worker.web.receipts import ReceiptsRoutes

logger = logging.getLogger(__name__)

MAX_GROUP = 1000  # statuses per transaction


class Metrics:
    """Counters of one app, in a registry of its own (served on /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cola_receipts_requests",
            "Callback requests by provider and outcome (ok, unsigned, bad_signature, bad_body, "
            "too_large, bad_content_type, not_configured, db_error, verified)",
            ["provider", "outcome"],
            registry=r,
        )
        self.statuses = Counter(
            "cola_receipts_statuses",
            "Statuses received, by result (new, duplicate, unknown: a message id we do not know, "
            "mismatched: the recipient differs from the job's)",
            ["result"],
            registry=r,
        )
        self.by_status = Counter(
            "cola_receipts_new_statuses", "New statuses by the provider's word", ["status"], registry=r
        )
        self.malformed = Counter(
            "cola_receipts_malformed_statuses",
            "Status entries skipped as malformed",
            ["provider"],
            registry=r,
        )
        self.settled = Counter(
            "cola_receipts_settled", "incierto rows settled to enviado by a receipt", registry=r
        )
        self.delivery_failed = Counter(
            "cola_receipts_delivery_failed",
            "Accepted messages whose delivery failed, by code",
            ["code"],
            registry=r,
        )
        self.inbound = Counter(
            "cola_receipts_inbound", "Inbound messages by kind (opt_out, other)", ["kind"], registry=r
        )
        self.write_errors = Counter(
            "cola_receipts_write_errors", "Group writes that failed (answered 503)", registry=r
        )

    def count(self, result: IngestResult) -> None:
        self.statuses.labels("new").inc(result.new)
        self.statuses.labels("duplicate").inc(result.duplicate)
        self.statuses.labels("unknown").inc(result.unknown)
        self.statuses.labels("mismatched").inc(result.mismatched)
        for word, n in result.by_status.items():
            self.by_status.labels(word).inc(n)
        self.settled.inc(len(result.settled))
        for code in result.failed_codes:
            self.delivery_failed.labels(code or "-").inc()
        self.inbound.labels("opt_out").inc(result.opt_outs)
        self.inbound.labels("other").inc(result.inbound_other)


@dataclass(slots=True)
class _Pending:
    statuses: Sequence[StatusEvent]
    inbound: Sequence[InboundMessage]
    done: asyncio.Future[None]


class GroupWriter:
    """Gathers what requests submit, writes it in one transaction, wakes them."""

    def __init__(self, repo: DeliveryRepository, metrics: Metrics) -> None:
        self.repo = repo
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.groups = 0

    async def submit(self, statuses: Sequence[StatusEvent], inbound: Sequence[InboundMessage]) -> None:
        if not statuses and not inbound:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(statuses, inbound, done))
        await done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            size = len(group[0].statuses)
            while not self.queue.empty() and size < MAX_GROUP:
                item = self.queue.get_nowait()
                group.append(item)
                size += len(item.statuses)
            statuses = [s for p in group for s in p.statuses]
            inbound = [m for p in group for m in p.inbound]
            try:
                result = await loop.run_in_executor(None, self.repo.ingest, statuses, inbound)
            except Exception as exc:
                self.metrics.write_errors.inc()
                logger.error("receipts: group write failed: %s: %s", type(exc).__name__, exc)
                for p in group:
                    if not p.done.done():
                        p.done.set_exception(exc)
                continue
            self.groups += 1
            self.metrics.count(result)
            for p in group:
                if not p.done.done():
                    p.done.set_result(None)


async def _sweep_forever(repo: DeliveryRepository, metrics: Metrics, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            result = await loop.run_in_executor(None, repo.sweep, settings.receipt_window)
            metrics.settled.inc(len(result.settled))
            for code in result.failed_codes:
                metrics.delivery_failed.labels(code or "-").inc()
        except Exception as exc:
            logger.warning("receipts: settle sweep failed: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(settings.receipt_sweep)


def make_app(settings: Settings, repo: DeliveryRepository) -> web.Application:
    """The application with the receipts router, ``/healthz`` and ``/metrics``."""
    metrics = Metrics()
    writer = GroupWriter(repo, metrics)
    # aiohttp refuses bodies over client_max_size (413) even without a Content-Length.
    app = web.Application(client_max_size=settings.receipts_max_body)
    ReceiptsRoutes(settings, writer.submit, metrics).add_to(app)
    tasks: list[asyncio.Task[None]] = []

    async def healthz(request: web.Request) -> web.Response:
        alive = bool(tasks) and not any(t.done() for t in tasks)
        return web.Response(status=200 if alive else 503, text="ok\n" if alive else "stopping\n")

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), content_type="text/plain", charset="utf-8"
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)

    async def background(app: web.Application) -> Any:
        tasks.append(asyncio.create_task(writer.run(), name="receipts-writer"))
        tasks.append(asyncio.create_task(_sweep_forever(repo, metrics, settings), name="receipts-sweep"))
        yield
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.append(background)
    return app


def _check_configured(settings: Settings) -> None:
    if not (settings.meta_app_secret or settings.twilio_auth_token or settings.webhook_secret):
        raise ConfigError(
            "receipts: no provider secret is set: COLA_META_APP_SECRET (Meta), COLA_TWILIO_AUTH_TOKEN "
            "(Twilio) or COLA_WEBHOOK_SECRET (webhook), or their _FILE variants"
        )
    if settings.receipts_public_url and not settings.receipts_public_url.startswith(("http://", "https://")):
        raise ConfigError(f"COLA_RECEIPTS_PUBLIC_URL: {settings.receipts_public_url!r} is not an http(s) URL")


async def _serve(settings: Settings, repo: DeliveryRepository) -> None:
    app = make_app(settings, repo)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.receipts_host, settings.receipts_port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"--port: cannot listen on {settings.receipts_host}:{settings.receipts_port}: {exc.strerror}"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    routes = [
        name
        for name, on in (
            ("/meta", settings.meta_app_secret),
            ("/twilio", settings.twilio_auth_token),
            ("/webhook", settings.webhook_secret),
        )
        if on
    ]
    server: Any = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.receipts_port
    where = f"http://{settings.receipts_host}:{port}"
    print(
        f"receipts: listening on {where} ({', '.join(routes)}; /healthz, /metrics)",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        # Stop accepting, let requests in flight finish their writes, then stop the writer.
        await runner.cleanup()


def command_receipts(args: argparse.Namespace, settings: Settings) -> int:
    """``cola-worker receipts``: serve until SIGTERM or SIGINT (exit 0)."""
    _check_configured(settings)
    engine = db.create_engine_from_settings(settings, pool_size=4)
    try:
        db.check_schema(engine)
        repo = DeliveryRepository(engine, parse_words(settings.opt_out_words))
        asyncio.run(_serve(settings, repo))
    finally:
        engine.dispose()
    print("receipts: stopped", file=sys.stderr)
    return 0


__all__ = ["GroupWriter", "Metrics", "command_receipts", "make_app"]
