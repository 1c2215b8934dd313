"""``cola-worker fake-provider``: a local server speaking the WhatsApp Cloud
API request/response shape, with latency, fault injection, its own rate and
pair limits, and a ledger of every message it accepted.

The faults reproduce what a real client must tell apart (docs/design.md section 4):

=============  ================================================  =========  ========
kind           answer                                            accepted   ledger
=============  ================================================  =========  ========
fail-before    500 with a Meta body, code 131000                 no         no
fail-after     500 with no Meta body                             yes        yes
stall-after    answers only after ``stall_seconds``              yes        yes
reset-after    connection reset (SO_LINGER 0), no answer         yes        yes
reset-before   connection reset before accepting, no answer      no         no
throttle       429, code 130429                                  no         no
pair-throttle  400, code 131056                                  no         no
invalid        400, code 131026                                  no         no
=============  ================================================  =========  ========

A request is decided when it arrives (limits, faults, ledger), then the
configured latency passes, then it is answered. Standard library only: the
HTTP/1.1 keep-alive ``ThreadingHTTPServer`` keeps up with the worker (see
bench/bench_sandbox.py). Flags and endpoints are documented in docs/providers.md.

With ``--receipts-url`` it also plays Meta's webhooks: for every message it
accepted it POSTs signed status callbacks (sent, delivered, read; a share
failed, duplicated, out of order or late) to that URL, retrying on non-2xx.
"""

from __future__ import annotations

import argparse
import heapq
import hmac
import http.client
import json
import logging
import random
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

from worker.errors import ConfigError
from worker.web.signing import META_HEADER, hmac_sha256_signature

logger = logging.getLogger(__name__)

FAULT_KINDS = (
    "fail-before",
    "fail-after",
    "stall-after",
    "reset-after",
    "reset-before",
    "throttle",
    "pair-throttle",
    "invalid",
)
ACCEPTING_FAULTS = frozenset({"fail-after", "stall-after", "reset-after"})
API_VERSION_PREFIX = "v"
# A steady client pacing exactly at the pair interval can arrive a few ms
# early because of scheduling; that is not a violation.
PAIR_TOLERANCE = 0.02
# Longer than any client's keep-alive expiry (httpx: 5 s), so the server never
# closes a connection the client is about to reuse.
IDLE_TIMEOUT = 75.0
ADMIN_PREFIX = "/_sandbox/"


def _digits(recipient: str) -> str:
    return "".join(ch for ch in recipient if ch.isdigit())


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class SandboxOptions:
    """Everything the sandbox does. Rates are probabilities in [0, 1] drawn
    per request (in the order of :data:`FAULT_KINDS`, with ``seed``);
    ``faults`` maps a recipient (digits) to a fault kind, deterministically."""

    host: str = "127.0.0.1"
    port: int = 8765
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    fail_before: float = 0.0
    fail_after: float = 0.0
    stall_after: float = 0.0
    reset_after: float = 0.0
    reset_before: float = 0.0
    throttle: float = 0.0
    pair_throttle: float = 0.0
    invalid: float = 0.0
    seed: int | None = None
    stall_seconds: float = 60.0
    faults: tuple[tuple[str, str], ...] = ()
    rate_limit: float = 0.0  # accepted messages per second per phone number id; 0 = off
    pair_interval: float = 0.0  # seconds between accepted messages to one recipient; 0 = off
    token: str | None = field(default=None, repr=False)  # None = accept any bearer token
    ledger: str | None = None  # JSON Lines file, appended to
    # Status webhooks (Meta's shape) for accepted messages; None = off.
    receipts_url: str | None = None
    receipts_secret: str | None = field(default=None, repr=False)  # Meta app secret to sign with
    receipts_failed: float = (
        0.0  # share of messages that get "failed" (131026/131049) instead of delivered+read
    )
    receipts_duplicate: float = 0.0  # share of messages with one status sent twice
    receipts_reorder: float = 0.0  # share of messages whose statuses go in reverse order
    receipts_late: float = 0.0  # share of messages with one status held back --receipts-late-ms
    receipts_late_ms: float = 2000.0
    receipts_delay_ms: float = 20.0  # each status waits up to this long after the previous one
    receipts_senders: int = 4  # concurrent webhook connections
    receipts_batch: int = 10  # statuses per webhook request, at most

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: {self.port} is not a port number (0 picks a free one)")
        for name in ("latency_ms", "jitter_ms", "stall_seconds", "rate_limit", "pair_interval"):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: {value!r} must be 0 or more")
        for kind, rate in self.rates():
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"--{kind}: {rate!r} is not a rate in [0, 1]")
        if sum(rate for _, rate in self.rates()) > 1.0 + 1e-9:
            raise ConfigError("the fault rates add up to more than 1")
        for name in ("receipts_failed", "receipts_duplicate", "receipts_reorder", "receipts_late"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not a rate in [0, 1]")
        if not (self.receipts_late_ms >= 0 and self.receipts_delay_ms >= 0):
            raise ConfigError("--receipts-late-ms and --receipts-delay-ms must be 0 or more")
        if self.receipts_senders < 1 or self.receipts_batch < 1:
            raise ConfigError("--receipts-senders and --receipts-batch must be at least 1")
        if self.receipts_url is not None:
            parts = urlsplit(self.receipts_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ConfigError(f"--receipts-url: {self.receipts_url!r} is not an http:// URL")
            if not self.receipts_secret:
                raise ConfigError("--receipts-url needs --receipts-secret (the app secret to sign with)")
        for recipient, kind in self.faults:
            if kind not in FAULT_KINDS:
                raise ConfigError(f"--fault: {kind!r} is not one of {', '.join(FAULT_KINDS)}")
            if not _digits(recipient):
                raise ConfigError(f"--fault: {recipient!r} is not a phone number")

    def rates(self) -> tuple[tuple[str, float], ...]:
        return tuple((kind, float(getattr(self, kind.replace("-", "_")))) for kind in FAULT_KINDS)


@dataclass(slots=True)
class _Decision:
    outcome: str  # "ok", a fault kind, "rate-limited", "pair-limited"
    message_id: str | None = None


class _ReceiptSender:
    """Meta-shaped status webhooks for accepted messages, signed with the app
    secret, sent by a few threads over keep-alive connections and retried with
    backoff on non-2xx or a connection error (up to ``MAX_ATTEMPTS``)."""

    MAX_ATTEMPTS = 30
    FAILED_CODES = ((131026, "Message undeliverable"), (131049, "Meta chose not to deliver"))

    def __init__(self, options: SandboxOptions) -> None:
        assert options.receipts_url is not None and options.receipts_secret is not None
        self.options = options
        self.url = urlsplit(options.receipts_url)
        self.secret = options.receipts_secret
        self.rng = random.Random(None if options.seed is None else options.seed + 2)
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int, int, dict[str, Any], str]] = []  # due, seq, attempt, status, sender
        self.seq = 0
        self.stopping = False
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.threads = [
            threading.Thread(target=self._loop, name=f"sandbox-receipts-{i}", daemon=True)
            for i in range(options.receipts_senders)
        ]
        for t in self.threads:
            t.start()

    def schedule(self, *, message_id: str, job_id: str, recipient: str, sender: str) -> None:
        o = self.options
        with self.cond:
            r = self.rng
            failed = r.random() < o.receipts_failed
            words = ["sent", "failed"] if failed else ["sent", "delivered", "read"]
            gaps = [r.uniform(0, o.receipts_delay_ms / 1000.0) for _ in words]
            times = [sum(gaps[: i + 1]) for i in range(len(words))]
            if r.random() < o.receipts_reorder:
                times.reverse()
            if r.random() < o.receipts_late:
                times[r.randrange(len(times))] += o.receipts_late_ms / 1000.0
            events = list(zip(words, times, strict=True))
            if r.random() < o.receipts_duplicate:
                word, at = events[r.randrange(len(events))]
                events.append((word, at + r.uniform(0, 0.2)))
            now = time.monotonic()
            for word, at in events:
                status: dict[str, Any] = {
                    "id": message_id,
                    "status": word,
                    "recipient_id": recipient,
                    "biz_opaque_callback_data": job_id,
                }
                if word == "failed":
                    code, title = self.FAILED_CODES[r.randrange(len(self.FAILED_CODES))]
                    status["errors"] = [{"code": code, "title": title}]
                self._push_locked(now + at, 0, status, sender)
            self.counts["scheduled"] += len(events)
            self.cond.notify_all()

    def _push_locked(self, due: float, attempt: int, status: dict[str, Any], sender: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, attempt, status, sender))

    def _take(self) -> list[tuple[float, int, int, dict[str, Any], str]] | None:
        with self.cond:
            while not self.stopping:
                now = time.monotonic()
                if self.heap and self.heap[0][0] <= now:
                    sender = self.heap[0][4]
                    batch: list[tuple[float, int, int, dict[str, Any], str]] = []
                    while self.heap and self.heap[0][0] <= now and len(batch) < self.options.receipts_batch:
                        if self.heap[0][4] != sender:
                            break
                        batch.append(heapq.heappop(self.heap))
                    self.in_flight += len(batch)
                    return batch
                self.cond.wait(min(0.5, self.heap[0][0] - now) if self.heap else 0.5)
            return None

    def _loop(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while True:
            batch = self._take()
            if batch is None:
                break
            sender = batch[0][4]
            now_s = str(int(time.time()))
            statuses = [dict(item[3], timestamp=now_s) for item in batch]
            body = json.dumps(
                {
                    "object": "whatsapp_business_account",
                    "entry": [
                        {
                            "id": "sandbox-waba",
                            "changes": [
                                {
                                    "field": "messages",
                                    "value": {
                                        "messaging_product": "whatsapp",
                                        "metadata": {
                                            "display_phone_number": sender,
                                            "phone_number_id": sender,
                                        },
                                        "statuses": statuses,
                                    },
                                }
                            ],
                        }
                    ],
                },
                separators=(",", ":"),
            ).encode()
            ok = False
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(
                        self.url.hostname or "", self.url.port or 80, timeout=10
                    )
                conn.request(
                    "POST",
                    self.url.path or "/",
                    body=body,
                    headers={
                        "Content-Type": "application/json",
                        META_HEADER: hmac_sha256_signature(self.secret, body),
                    },
                )
                response = conn.getresponse()
                response.read()
                ok = 200 <= response.status < 300
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            with self.cond:
                self.in_flight -= len(batch)
                if ok:
                    self.counts["posted"] += 1
                    self.counts["delivered"] += len(batch)
                else:
                    self.counts["failed_posts"] += 1
                    for _, _, attempt, status, snd in batch:
                        if attempt + 1 >= self.MAX_ATTEMPTS:
                            self.counts["dropped"] += 1
                            continue
                        self.counts["retries"] += 1
                        delay = min(5.0, 0.2 * 2**attempt)
                        self._push_locked(time.monotonic() + delay, attempt + 1, status, snd)
                self.cond.notify_all()
        if conn is not None:
            conn.close()

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return {
                "url": self.options.receipts_url,
                "scheduled": self.counts["scheduled"],
                "delivered": self.counts["delivered"],
                "posted": self.counts["posted"],
                "failed_posts": self.counts["failed_posts"],
                "retries": self.counts["retries"],
                "dropped": self.counts["dropped"],
                "pending": len(self.heap) + self.in_flight,
            }

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=12)


class _State:
    """Counters, limits, faults and the ledger, behind one lock."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._ledger_file: IO[str] | None = None
        self.receipts = _ReceiptSender(options) if options.receipts_url else None
        if options.ledger:
            self._ledger_file = open(options.ledger, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._reset_locked()

    def _reset_locked(self) -> None:
        self.rng = random.Random(self.options.seed)
        self.latency_rng = random.Random(None if self.options.seed is None else self.options.seed + 1)
        self.faults: dict[str, str] = {_digits(r): k for r, k in self.options.faults}
        self.ledger: list[dict[str, Any]] = []
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.jobs: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, at)
        self.last_accepted: dict[str, float] = {}  # recipient digits -> monotonic time
        self.in_flight: Counter[str] = Counter()
        self.in_flight_total = 0
        self.max_in_flight = 0
        self.started = time.monotonic()

    def reset(self) -> None:
        with self.lock:
            self._reset_locked()

    def close(self) -> None:
        if self.receipts is not None:
            self.receipts.stop()
        with self.lock:
            if self._ledger_file is not None:
                self._ledger_file.close()
                self._ledger_file = None

    def set_faults(self, faults: dict[str, str | None], *, replace: bool = False) -> dict[str, str]:
        for recipient, kind in faults.items():
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"{kind!r} is not one of {', '.join(FAULT_KINDS)}")
            if not _digits(recipient):
                raise ValueError(f"{recipient!r} is not a phone number")
        with self.lock:
            if replace:
                self.faults.clear()
            for recipient, kind in faults.items():
                if kind is None:
                    self.faults.pop(_digits(recipient), None)
                else:
                    self.faults[_digits(recipient)] = kind
            return dict(self.faults)

    def begin(self, recipient: str) -> None:
        with self.lock:
            if self.in_flight[recipient] > 0:
                self.violations["concurrent_recipient"] += 1
            self.in_flight[recipient] += 1
            self.in_flight_total += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight_total)

    def end(self, recipient: str) -> None:
        with self.lock:
            self.in_flight[recipient] -= 1
            if self.in_flight[recipient] <= 0:
                del self.in_flight[recipient]
            self.in_flight_total -= 1

    def count(self, outcome: str) -> None:
        with self.lock:
            self.requests += 1
            self.outcomes[outcome] += 1

    def latency(self) -> float:
        opts = self.options
        if opts.latency_ms <= 0 and opts.jitter_ms <= 0:
            return 0.0
        with self.lock:
            jitter = self.latency_rng.uniform(-opts.jitter_ms, opts.jitter_ms) if opts.jitter_ms else 0.0
        return max(0.0, opts.latency_ms + jitter) / 1000.0

    def decide(self, *, recipient: str, sender: str, job_id: str, kind: str) -> _Decision:
        opts = self.options
        with self.lock:
            self.requests += 1
            now = time.monotonic()
            outcome = self.faults.get(recipient) or self._draw_locked()
            if outcome not in ("ok", *ACCEPTING_FAULTS):
                self.outcomes[outcome] += 1
                return _Decision(outcome)
            if opts.pair_interval > 0:
                last = self.last_accepted.get(recipient)
                if last is not None and now - last < opts.pair_interval - PAIR_TOLERANCE:
                    self.violations["pair_interval"] += 1
                    self.outcomes["pair-limited"] += 1
                    return _Decision("pair-limited")
            if opts.rate_limit > 0:
                capacity = max(1.0, opts.rate_limit)  # below 1/s: one message, then wait
                tokens, at = self.buckets.get(sender, (capacity, now))
                tokens = min(capacity, tokens + (now - at) * opts.rate_limit)
                if tokens < 1.0:
                    self.buckets[sender] = (tokens, now)
                    self.violations["rate_limit"] += 1
                    self.outcomes["rate-limited"] += 1
                    return _Decision("rate-limited")
                self.buckets[sender] = (tokens - 1.0, now)
            self.last_accepted[recipient] = now
            message_id = "wamid.sandbox." + uuid.uuid4().hex
            entry = {
                "ts": _utc_now(),
                "message_id": message_id,
                "job_id": job_id,
                "to": recipient,
                "phone_number_id": sender,
                "type": kind,
                "fault": None if outcome == "ok" else outcome,
            }
            self.ledger.append(entry)
            self.jobs[job_id] += 1
            self.outcomes[outcome] += 1
            if self._ledger_file is not None:
                self._ledger_file.write(json.dumps(entry, separators=(",", ":")) + "\n")
            if self.receipts is not None:
                self.receipts.schedule(
                    message_id=message_id, job_id=job_id, recipient=recipient, sender=sender
                )
            return _Decision(outcome, message_id)

    def _draw_locked(self) -> str:
        rates = self.options.rates()
        if not any(rate for _, rate in rates):
            return "ok"
        u = self.rng.random()
        total = 0.0
        for kind, rate in rates:
            total += rate
            if u < total:
                return kind
        return "ok"

    def stats(self) -> dict[str, Any]:
        with self.lock:
            accepted = len(self.ledger)
            return {
                "requests": self.requests,
                "accepted": accepted,
                "outcomes": dict(sorted(self.outcomes.items())),
                "duplicates": {job: n for job, n in sorted(self.jobs.items()) if n > 1},
                "violations": {
                    "rate_limit": self.violations["rate_limit"],
                    "pair_interval": self.violations["pair_interval"],
                    "concurrent_recipient": self.violations["concurrent_recipient"],
                },
                "in_flight": self.in_flight_total,
                "max_in_flight": self.max_in_flight,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "faults": dict(self.faults),
                "ledger_file": self.options.ledger,
                "receipts": self.receipts.stats() if self.receipts is not None else None,
            }

    def ledger_copy(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(e) for e in self.ledger]


def _meta_error(code: int, message: str, *, kind: str = "OAuthException") -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": kind,
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": message},
            "fbtrace_id": "sandbox-" + uuid.uuid4().hex[:12],
        }
    }


# outcome -> (HTTP status, Meta code, message) for answers that refuse the message.
_REFUSALS: dict[str, tuple[int, int, str]] = {
    "fail-before": (500, 131000, "Something went wrong (sandbox fail-before)"),
    "throttle": (429, 130429, "Rate limit hit (sandbox throttle)"),
    "rate-limited": (429, 130429, "Rate limit hit (sandbox --rate-limit)"),
    "pair-throttle": (400, 131056, "Pair rate limit hit (sandbox pair-throttle)"),
    "pair-limited": (400, 131056, "Pair rate limit hit (sandbox --pair-interval)"),
    "invalid": (400, 131026, "Message undeliverable (sandbox invalid)"),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def close_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().close_request(request)

    def shutdown_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # client went away: normal for faults and timeouts
            return
        logger.exception("sandbox: error while handling a request")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cola-sandbox/1"
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request is noise; paths carry no personal data, but stay quiet

    # -- helpers ---------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        return self.rfile.read(int(length))

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._send(status, body, "application/json", headers)

    def _reset_connection(self) -> None:
        """Abort the connection: RST instead of FIN, so the client sees a reset."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    # -- routes ------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        state = self.server.state
        if path == ADMIN_PREFIX + "stats":
            self._send_json(200, state.stats())
        elif path == ADMIN_PREFIX + "ledger":
            self._send_json(200, {"messages": state.ledger_copy()})
        elif path == ADMIN_PREFIX + "faults":
            self._send_json(200, {"faults": state.stats()["faults"]})
        elif path == ADMIN_PREFIX + "health":
            self._send_json(200, {"ok": True})
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        body = self._read_body()
        path = self.path.split("?", 1)[0]
        if path.startswith(ADMIN_PREFIX):
            self._admin_post(path, body)
            return
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[2] == "messages" and parts[0].startswith(API_VERSION_PREFIX):
            self._messages(parts[1], body)
        else:
            self._send(404, b"not found\n", "text/plain")

    def _admin_post(self, path: str, body: bytes) -> None:
        state = self.server.state
        if path == ADMIN_PREFIX + "reset":
            state.reset()
            self._send_json(200, {"ok": True})
            return
        if path == ADMIN_PREFIX + "faults":
            try:
                payload = json.loads(body or b"{}")
                faults = payload.get("faults", {})
                if not isinstance(faults, dict):
                    raise ValueError("'faults' must be an object of recipient -> kind or null")
                current = state.set_faults(faults, replace=bool(payload.get("replace", False)))
            except (ValueError, AttributeError) as exc:
                self._send_json(400, {"error": str(exc)})
                return
            self._send_json(200, {"faults": current})
            return
        self._send(404, b"not found\n", "text/plain")

    def _messages(self, phone_number_id: str, body: bytes) -> None:
        state = self.server.state
        token = state.options.token
        if token is not None:
            auth = self.headers.get("Authorization", "")
            given = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                state.count("unauthorized")
                self._send_json(401, _meta_error(190, "Invalid OAuth access token (sandbox)"))
                return
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict) or payload.get("messaging_product") != "whatsapp":
                raise ValueError("messaging_product must be 'whatsapp'")
            recipient = _digits(str(payload.get("to") or ""))
            if not recipient:
                raise ValueError("'to' is missing")
            kind = payload.get("type")
            if kind == "text":
                if not (payload.get("text") or {}).get("body"):
                    raise ValueError("text.body is missing")
            elif kind == "template":
                if not (payload.get("template") or {}).get("name"):
                    raise ValueError("template.name is missing")
            else:
                raise ValueError("type must be 'text' or 'template'")
            job_id = str(payload.get("biz_opaque_callback_data") or "")
        except (ValueError, AttributeError, TypeError) as exc:
            state.count("bad-request")
            self._send_json(400, _meta_error(100, f"Invalid parameter: {exc}"))
            return

        state.begin(recipient)
        try:
            decision = state.decide(recipient=recipient, sender=phone_number_id, job_id=job_id, kind=kind)
            delay = state.latency()
            if delay and state.stopping.wait(delay):
                self.close_connection = True
                return
            self._answer(decision, recipient)
        finally:
            state.end(recipient)

    def _answer(self, decision: _Decision, recipient: str) -> None:
        outcome = decision.outcome
        if outcome in _REFUSALS:
            status, code, message = _REFUSALS[outcome]
            self._send_json(status, _meta_error(code, message))
            return
        if outcome == "fail-after":
            self._send(500, b"Internal Server Error\n", "text/plain")
            return
        if outcome in ("reset-after", "reset-before"):
            self._reset_connection()
            return
        if outcome == "stall-after":
            self.close_connection = True
            if self.server.state.stopping.wait(self.server.state.options.stall_seconds):
                return
        self._send_json(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": recipient, "wa_id": recipient}],
                "messages": [{"id": decision.message_id}],
            },
        )


class SandboxServer:
    """The sandbox in a background thread: ``start()`` returns the base URL."""

    def __init__(self, options: SandboxOptions | None = None) -> None:
        self.options = options or SandboxOptions()
        self._state: _State | None = None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the sandbox is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    def start(self) -> str:
        if self._httpd is not None:
            return self.base_url
        state = _State(self.options)
        try:
            httpd = _Server((self.options.host, self.options.port), state)
        except BaseException:
            state.close()
            raise
        self._state, self._httpd = state, httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="cola-sandbox", daemon=True
        )
        self._thread.start()
        if self.options.host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning("sandbox listening on %s: admin endpoints have no authentication", self.base_url)
        else:
            logger.info("sandbox listening on %s", self.base_url)
        return self.base_url

    def stop(self) -> None:
        httpd, state, thread = self._httpd, self._state, self._thread
        if httpd is None or state is None:
            return
        state.stopping.set()  # wakes stalled answers and latency sleeps
        httpd.shutdown()
        httpd.server_close()
        httpd.shutdown_connections()
        if thread is not None:
            thread.join(timeout=5)
        deadline = time.monotonic() + 2.0
        while httpd.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        state.close()
        self._httpd = self._thread = None

    def _require_state(self) -> _State:
        if self._state is None:
            raise RuntimeError("the sandbox was never started")
        return self._state

    def ledger(self) -> list[dict[str, Any]]:
        return self._require_state().ledger_copy()

    def stats(self) -> dict[str, Any]:
        return self._require_state().stats()

    def reset(self) -> None:
        self._require_state().reset()

    def set_faults(self, faults: dict[str, str | None], *, replace: bool = False) -> dict[str, str]:
        return self._require_state().set_faults(faults, replace=replace)

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- command line ------------------------------------------------------------------


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a rate in [0, 1]")
    return rate


def _fault(value: str) -> tuple[str, str]:
    recipient, sep, kind = value.partition("=")
    if not sep or not _digits(recipient) or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not RECIPIENT=KIND with KIND one of {', '.join(FAULT_KINDS)}"
        )
    return recipient, kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SandboxOptions()
    parser.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=d.port, help="port (default %(default)s; 0 picks a free one)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added latency per request, ms")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="latency varies by +- this many ms")
    rate_help = {
        "fail-before": "500 with Meta code 131000; not accepted",
        "fail-after": "accepted (ledger), then 500 with no Meta body",
        "stall-after": "accepted (ledger), then answer only after --stall-seconds",
        "reset-after": "accepted (ledger), then the connection is reset",
        "reset-before": "the connection is reset before accepting; not accepted",
        "throttle": "429 with Meta code 130429; not accepted",
        "pair-throttle": "400 with Meta code 131056; not accepted",
        "invalid": "400 with Meta code 131026; not accepted",
    }
    for kind in FAULT_KINDS:
        parser.add_argument(
            f"--{kind}", type=_rate, default=0.0, metavar="RATE", help=f"share of requests: {rate_help[kind]}"
        )
    parser.add_argument("--seed", type=int, default=None, help="seed of the fault draws (reproducible runs)")
    parser.add_argument(
        "--stall-seconds", type=float, default=d.stall_seconds, help="stall-after delay (default %(default)s)"
    )
    parser.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="RECIPIENT=KIND",
        help=f"always answer RECIPIENT with KIND ({', '.join(FAULT_KINDS)}); repeatable",
    )
    parser.add_argument(
        "--rate-limit", type=float, default=0.0, help="accepted messages/s per phone number id (0: off)"
    )
    parser.add_argument(
        "--pair-interval",
        type=float,
        default=0.0,
        help="min seconds between messages to one recipient (0: off)",
    )
    parser.add_argument("--token", default=None, help="accept only this bearer token (default: any)")
    parser.add_argument(
        "--ledger", default=None, metavar="FILE", help="append accepted messages here (JSON Lines)"
    )
    g = parser.add_argument_group("status webhooks (Meta's shape) for accepted messages")
    g.add_argument(
        "--receipts-url", default=None, metavar="URL", help="POST them here (e.g. http://127.0.0.1:8766/meta)"
    )
    g.add_argument("--receipts-secret", default=None, metavar="SECRET", help="app secret to sign them with")
    g.add_argument(
        "--receipts-failed", type=_rate, default=0.0, metavar="RATE", help="share failed (131026/131049)"
    )
    g.add_argument(
        "--receipts-duplicate", type=_rate, default=0.0, metavar="RATE", help="share with a status sent twice"
    )
    g.add_argument(
        "--receipts-reorder", type=_rate, default=0.0, metavar="RATE", help="share in reverse order"
    )
    g.add_argument(
        "--receipts-late", type=_rate, default=0.0, metavar="RATE", help="share with one status held back"
    )
    g.add_argument(
        "--receipts-late-ms", type=float, default=d.receipts_late_ms, help="how long (default %(default)s)"
    )
    g.add_argument(
        "--receipts-delay-ms",
        type=float,
        default=d.receipts_delay_ms,
        help="max gap between statuses (default %(default)s)",
    )
    g.add_argument(
        "--receipts-senders", type=int, default=d.receipts_senders, help="connections (default %(default)s)"
    )
    g.add_argument(
        "--receipts-batch",
        type=int,
        default=d.receipts_batch,
        help="statuses per request (default %(default)s)",
    )


def options_from_args(args: argparse.Namespace) -> SandboxOptions:
    return SandboxOptions(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        fail_before=args.fail_before,
        fail_after=args.fail_after,
        stall_after=args.stall_after,
        reset_after=args.reset_after,
        reset_before=args.reset_before,
        throttle=args.throttle,
        pair_throttle=args.pair_throttle,
        invalid=args.invalid,
        seed=args.seed,
        stall_seconds=args.stall_seconds,
        faults=tuple(args.fault),
        rate_limit=args.rate_limit,
        pair_interval=args.pair_interval,
        token=args.token,
        ledger=args.ledger,
        receipts_url=args.receipts_url,
        receipts_secret=args.receipts_secret,
        receipts_failed=args.receipts_failed,
        receipts_duplicate=args.receipts_duplicate,
        receipts_reorder=args.receipts_reorder,
        receipts_late=args.receipts_late,
        receipts_late_ms=args.receipts_late_ms,
        receipts_delay_ms=args.receipts_delay_ms,
        receipts_senders=args.receipts_senders,
        receipts_batch=args.receipts_batch,
    )


def main_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT. Returns the exit code."""
    try:
        options = options_from_args(args)
    except ConfigError as exc:
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    server = SandboxServer(options)
    try:
        url = server.start()
    except OSError as exc:
        print(
            f"fake-provider: cannot listen on {options.host}:{options.port}: {exc.strerror}", file=sys.stderr
        )
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"fake-provider: listening on {url}", file=sys.stderr)
        print(f"fake-provider: ledger {options.ledger or '(in memory only)'}", file=sys.stderr)
        print(f"fake-provider: use COLA_PROVIDER=fake COLA_FAKE_BASE_URL={url}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        stats = server.stats()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(
        f"fake-provider: stopped; {stats['requests']} requests, {stats['accepted']} accepted, "
        f"{len(stats['duplicates'])} duplicated job ids",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cola-worker fake-provider", description=(__doc__ or "").split("\n\n")[0]
    )
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
