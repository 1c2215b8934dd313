"""`run --loop`: /metrics (Prometheus text format) and /healthz on one port.

The counters are read from the runner at scrape time (a custom collector), so
the hot path does no metrics work at all."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker.runner import Runner


class _RunnerCollector(Collector):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Any]:
        c = self.runner.counts
        fam = CounterMetricFamily(
            "cola_messages", "Messages handled by this process, by outcome", labels=["outcome"]
        )
        for outcome, value in (
            ("claimed", c.claimed),
            ("sent", c.sent),
            ("retry", c.retried),
            ("throttled", c.throttled),
            ("error", c.failed),
            ("uncertain", c.uncertain),
            ("expired", c.expired),
            ("lost", c.lost),
        ):
            fam.add_metric([outcome], value)
        yield fam
        rate = GaugeMetricFamily("cola_rate_limit", "Current send rate limit, messages per second")
        rate.add_metric([], self.runner.rate.rate)
        yield rate


class MetricsServer:
    def __init__(self, runner: Runner, port: int, host: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_RunnerCollector(runner))
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body = generate_latest(registry)
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                    status = 200
                elif self.path.startswith("/healthz"):
                    stuck = runner.heartbeat_withheld  # no database write succeeds
                    healthy = not runner.stop_event.is_set() and not stuck
                    body = b"ok\n" if healthy else b"stuck\n" if stuck else b"stopping\n"
                    ctype = "text/plain"
                    status = 200 if healthy else 503
                else:
                    body, ctype, status = b"not found\n", "text/plain", 404
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
