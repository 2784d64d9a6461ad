"""Prometheus metrics and the /metrics, /healthz, /readyz endpoint: the only module that imports
prometheus_client.

The endpoint is a small HTTP/1.1 server on the event loop (asyncio.start_server), not
prometheus_client's threaded server, so it is a named task in the app's TaskGroup and stops with it.
Rendering the registry takes well under a millisecond for these few series, so it runs on the loop.
Handlers read only metric objects and two predicates; they never touch the store or the worker.
`/healthz` answers while the process serves HTTP at all; `/readyz` only while the store is open
and the model answers. Bind it to loopback (the default) unless a firewall guards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from agent.base.records import Completion, ModelInfo, QueueStats

log = structlog.get_logger()

PREFIX = "edge_agent"
# Why an outbox record was dropped: the store counts TTL expiry under `<route>/ttl` and drops at
# the outbox bound under the route (agent/store/transactions.py, expire and _drop_over_bound).
DROP_REASONS = ("outbox_full", "ttl")
_REQUEST_TIMEOUT_S = 5.0
_MAX_HEADER_LINES = 100


class Metrics:
    """Every series the agent exports, on a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_rows = Gauge("edge_agent_queue_rows", "Rows waiting in a store table.",
                                ["queue"], registry=r)
        self.queue_bytes = Gauge("edge_agent_queue_payload_bytes",
                                 "Payload bytes waiting in a store table.", ["queue"], registry=r)
        self.oldest_undelivered = Gauge(
            "edge_agent_oldest_undelivered_seconds",
            "Age of the oldest outbox row not yet acknowledged by the cloud broker (0 if none).",
            registry=r)
        self.dead_letters = Gauge("edge_agent_dead_letters", "Rows in the dead-letter table.",
                                  registry=r)
        self.delivered = Gauge("edge_agent_delivered_records",
                               "Records the cloud broker acknowledged, over the store's life.",
                               registry=r)
        self.results = Counter("edge_agent_results_total", "Readings finished by the pipeline.",
                               ["route", "executor", "outcome"], registry=r)
        self.latency = Histogram(
            "edge_agent_inference_latency_seconds", "Time of one inference request.", ["route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tokens_per_s = Histogram(
            "edge_agent_inference_tokens_per_second", "Completion tokens per second.", ["route"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.dropped = Counter(
            "edge_agent_dropped_records_total",
            "Outbox records dropped, over the store's life: at its bound under "
            "[store] when_full = drop_oldest (reason outbox_full) or past their route's ttl_s "
            "(reason ttl). The store's drops table counts them per route.",
            ["reason"], registry=r)
        self.link_up = Gauge("edge_agent_link_up", "1 while connected to the broker.",
                             ["broker"], registry=r)
        self.reconnects = Counter("edge_agent_reconnects_total",
                                  "Connections to a broker after the first one.", ["broker"],
                                  registry=r)
        self.model = Gauge("edge_agent_model_info", "The active model (value 1).",
                           ["name", "version", "sha256"], registry=r)
        self.worker_restarts = Counter("edge_agent_worker_restarts_total",
                                       "Inference worker restarts after a hang or crash.",
                                       registry=r)
        self.model_load_failures = Counter(
            "edge_agent_model_load_failures_total",
            "Worker restarts whose model did not load (readings wait in the inbox meanwhile).",
            registry=r)
        self.stalled = Gauge("edge_agent_loop_stalled",
                             "1 while a critical loop is stalled (watchdog withheld).", ["loop"],
                             registry=r)
        self.ready = Gauge("edge_agent_ready", "1 while /readyz answers 200.", registry=r)
        self.route_waiting = Gauge(
            "edge_agent_route_waiting",
            "1 while a route's readings wait in the inbox for its executor (the model does not "
            "load, the cloud is down).", ["route"], registry=r)
        self.sessions_lost = Counter(
            "edge_agent_session_lost_total",
            "Connects to the local broker that found the agent's persistent session gone "
            "(readings published meanwhile were lost by the broker).", registry=r)
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        self._seen: dict[str, int] = {}

    # -- from the loop ---------------------------------------------------------------------

    def result_recorded(
        self, route: str, executor: str, outcome: str, completion: Completion | None
    ) -> None:
        """PipelineObserver: count the result and time its (last) inference request."""
        self.results.labels(route=route, executor=executor, outcome=outcome).inc()
        if completion is not None:
            seconds = completion.latency_ms / 1000
            self.latency.labels(route=route).observe(seconds)
            if seconds > 0 and completion.completion_tokens:
                self.tokens_per_s.labels(route=route).observe(
                    completion.completion_tokens / seconds)

    def route_waits(self, route: str, waiting: bool) -> None:
        """PipelineObserver: a route started or stopped waiting for its executor."""
        self.route_waiting.labels(route=route).set(1 if waiting else 0)

    def session_lost(self) -> None:
        """IngestObserver: the local broker lost the agent's persistent session."""
        self.sessions_lost.inc()

    def active_model(self, info: ModelInfo) -> None:
        self.model.clear()
        self.model.labels(name=info.name, version=info.version, sha256=info.sha256).set(1)

    def sample(
        self,
        stats: QueueStats,
        *,
        links: dict[str, tuple[bool, int]],
        worker_restarts: int,
        model_load_failures: int = 0,
        dropped: dict[str, int] | None = None,
        stalled: list[str],
        loops: list[str],
        ready: bool,
    ) -> None:
        """Copy a periodic snapshot into the gauges; counters advance by what changed since.
        `dropped` is the store's count of dropped records by reason, over its life."""
        self.queue_rows.labels(queue="inbox").set(stats.inbox)
        self.queue_rows.labels(queue="outbox").set(stats.outbox)
        self.queue_bytes.labels(queue="inbox").set(stats.inbox_bytes)
        self.queue_bytes.labels(queue="outbox").set(stats.outbox_bytes)
        self.oldest_undelivered.set(stats.oldest_undelivered_s or 0.0)
        self.dead_letters.set(stats.dead_letter)
        self.delivered.set(stats.delivered)
        for broker, (up, connects) in links.items():
            self.link_up.labels(broker=broker).set(1 if up else 0)
            self._advance(self.reconnects.labels(broker=broker), f"reconnects_{broker}",
                          max(0, connects - 1))
        self._advance(self.worker_restarts, "worker_restarts", worker_restarts)
        self._advance(self.model_load_failures, "model_load_failures", model_load_failures)
        for reason, total in (dropped or {}).items():
            self._advance(self.dropped.labels(reason=reason), f"dropped_{reason}", total)
        for loop in loops:
            self.stalled.labels(loop=loop).set(1 if loop in stalled else 0)
        self.ready.set(1 if ready else 0)

    def _advance(self, counter: Any, key: str, total: int) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Endpoint:
    """GET /metrics, /healthz, /readyz on `host:port`, served from the event loop."""

    def __init__(self, metrics: Metrics, ready: Callable[[], str | None]) -> None:
        # ready() returns None when ready, else the reason it is not.
        self._metrics = metrics
        self._ready = ready
        self.port: int | None = None
        self.listening = asyncio.Event()

    async def serve(self, host: str, port: int) -> None:
        """Listen until cancelled."""
        server = await asyncio.start_server(self._handle, host, port)
        self.port = int(server.sockets[0].getsockname()[1])
        self.listening.set()
        log.info("metrics_serving", host=host, port=self.port,
                 url=f"http://{host}:{self.port}/metrics")
        async with server:
            await server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, body = await asyncio.wait_for(
                self._respond(reader), _REQUEST_TIMEOUT_S)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # a slow or broken client; it gets nothing and the endpoint moves on
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        request = (await reader.readline()).decode("latin-1").split()
        for _ in range(_MAX_HEADER_LINES):
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                break
        if len(request) < 2 or request[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = request[1].split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.render()
        if path == "/healthz":
            return "200 OK", "text/plain", b"alive\n"
        if path == "/readyz":
            reason = self._ready()
            if reason is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {reason}\n".encode()
        return "404 Not Found", "text/plain", b"/metrics, /healthz or /readyz\n"


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Read a running agent's /metrics (blocking; for the command line, never the daemon):
    series name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return series
