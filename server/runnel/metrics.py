"""Prometheus metrics of one server (``GET /metrics``), through ``prometheus_client``.

Every name is ``runnel_*`` with its unit in it; labels are low-cardinality: the route's
template (never the path), the method (or "other"), the status class ("2xx"), the app's
name, a finish reason, a run state, a webhook outcome.

Where each number comes from, and what it costs:

- Per request, once, when it is finished (the ``runnel_request_finished`` hook): the HTTP
  counters and histograms, and the generation's, read from ``request.generation`` (a
  ``runnel.generation_record.GenerationRecord``, the same record the access log reads).
  Nothing is observed per token.
- At scrape time, from state the server keeps anyway (``LiveState.collect``): open
  connections, requests in flight, refused connections, each app's state, its waiting and
  running rows, its batch sizes and folds (an app's optional ``batching_stats()``), runs queued
  and running. Nothing on the hot path at all.
- Runs (runnel.runs.Runner calls ``RunMetrics``' methods): accepted, finished by state
  with their duration, recovered after a crash, webhook deliveries by outcome.
- Process: prometheus_client's process, platform and GC collectors.

Each server has its own registry, so several servers in one process stay apart.

Workers (``runnel serve --workers N``): the supervisor gives each worker one
``PROMETHEUS_MULTIPROC_DIR``, so prometheus_client keeps every counter and histogram in
files there, one per process, and ``render`` sums them over every worker, dead ones too
(a scrape reaches one worker; its answer is the whole server's). The scrape-time state
(``LiveState``) cannot be read across processes, so each worker copies it into
multiprocess gauges (``LiveGauges``) every ``LIVE_REFRESH`` seconds and before it renders:
summed over the live workers (connections, rows, runs), their minimum for ``app_ready``
(ready only when every worker is); refused connections and batch sizes go in as counter
and histogram increments, so they survive the worker that counted them. The process
collectors are not summed (prometheus_client has no multiprocess form of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .hookspecs import hookimpl
from .http.protocol import CLIENT_GONE

if TYPE_CHECKING:
    from .apps import AppRegistry
    from .generation_record import GenerationRecord
    from .http import Request, ServerState
    from .runs import Runner

# The text format every Prometheus reads (generate_latest writes it; newer clients call
# their default 1.0.0, which older servers refuse).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# Buckets that resolve a GPU's milliseconds and a CPU's seconds alike (vLLM's, widened).
HTTP_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                         30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
               240.0, 480.0)
RUN_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# An app's optional batching_stats() "folds" / "folded_rows" (runnel-ctranslate2's scheduler).
FOLDS_HELP = "Running batches stopped at a step to take waiting rows in (admission at the next step)"
FOLDED_ROWS_HELP = "Rows stopped by those folds and resumed in a new batch"

_STATUS_CLASS = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
UNMATCHED = "unmatched"  # the route label of a request no route matched (404, a bad head)
TOO_MANY_REQUESTS = 429
_NEVER_STARTED = frozenset(("rejected", "expired"))  # outcomes of generations the model never began


def status_class(status: int) -> str:
    return _STATUS_CLASS[status // 100] if 0 <= status < 600 else "other"


def outcome(record: GenerationRecord, status: int) -> str:
    """A generation request's finish reason for the metrics: the model's ("stop", "length";
    "length" if any choice ran out), or what cut it short: "error" (the backend failed),
    "rejected" (429: the queue was full), "expired" (its deadline passed before the model
    started it: refused, or dropped from the queue), "cancelled" (the client went away),
    "interrupted" (ended by the server, e.g. at shutdown)."""
    if record.expired:
        return "expired"
    if record.failed:
        return "error"
    if record.ended_at:
        reasons = record.reasons
        return "length" if len(reasons) > 1 and "length" in reasons else reasons[0]
    if status == TOO_MANY_REQUESTS:
        return "rejected"
    return "cancelled" if status == CLIENT_GONE else "interrupted"


LIVE_REFRESH = 1.0  # seconds between a worker's copies of its live state (multiprocess mode)


class Metrics:
    """The metrics of one server; a plugin (``runnel_request_finished``) once registered.
    ``multiprocess_dir``: this server is one of several workers summed there (see above)."""

    def __init__(self, apps: AppRegistry, multiprocess_dir: str | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self._apps = apps
        self._live = LiveState(apps)
        self._live_gauges: LiveGauges | None = None
        self._refreshing: asyncio.Task[None] | None = None
        if multiprocess_dir is None:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            registry.register(self._live)
        else:
            self._live_gauges = gauges = LiveGauges(self._live)
            # Readiness is the minimum over the workers' last copies: a copy taken while an
            # app loaded would say 0 for up to LIVE_REFRESH after the worker turned ready.
            apps.watch(gauges.copy_ready)
        self.http_requests = Counter("runnel_http_requests", "HTTP requests finished, by route template, "
                                     "method and status class (499: the client went away first)",
                                     ("route", "method", "status"), registry=registry)
        self.http_duration = Histogram("runnel_http_request_duration_seconds", "From the request head to the "
                                       "response's last byte", ("route", "method"), buckets=HTTP_DURATION_BUCKETS,
                                       registry=registry)
        self.http_bytes = Counter("runnel_http_response_bytes", "Bytes of whole (not streamed) responses, "
                                  "head and body; streams are measured in tokens", ("route",), registry=registry)
        self.generation_requests = Counter(
            "runnel_generation_requests", "Generation requests by app and finish reason (stop, length, error, "
            "rejected = 429 queue full, expired = deadline passed before it started, cancelled = client gone, "
            "interrupted)", ("app", "finish_reason"),
            registry=registry)
        self.ttft = Histogram("runnel_generation_time_to_first_token_seconds", "From the request head to the "
                              "first generated text", ("app",), buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("runnel_generation_inter_token_latency_seconds", "Mean time between a choice's "
                             "tokens, one observation per request: (end - first token) / (tokens per choice - 1)",
                             ("app",), buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("runnel_generation_e2e_latency_seconds", "From the request head to the last "
                             "choice's end", ("app",), buckets=E2E_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("runnel_generation_prompt_tokens", "Prompt tokens of generations the "
                                     "app admitted", ("app",), registry=registry)
        self.generated_tokens = Counter("runnel_generation_generated_tokens", "Tokens generated (those of "
                                        "finished choices)", ("app",), registry=registry)
        self.runs = RunMetrics(registry)
        # Label children, looked up by one dict get per request instead of labels()' lock
        # and argument checks: (route, method, status) -> (requests, duration, bytes), and
        # (app, reason) -> that generation's children. The labels are few, so these stay small.
        self._http_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._generation_children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def bind(self, server_state: ServerState, runner: Runner | None) -> None:
        """What the scrape-time gauges read, once the server has started (on its loop)."""
        self._live.server_state = server_state
        self._live.runner = runner
        if self._live_gauges is not None and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_forever(self._live_gauges))

    async def _refresh_forever(self, gauges: LiveGauges) -> None:
        while True:
            gauges.refresh()
            await asyncio.sleep(LIVE_REFRESH)

    async def close(self) -> None:
        """Stop copying the live state (the server stops)."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
            self._refreshing = None

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        assert self._live_gauges is not None
        self._live_gauges.refresh()  # this worker's state as of now; the others' as of their last copy
        summed = CollectorRegistry()
        _WorkersCollector(summed, path=self.multiprocess_dir)
        return generate_latest(summed)

    @hookimpl
    def runnel_request_finished(self, request: Request, status: int, elapsed: float) -> None:
        route = request.route
        key = (route.template if route is not None else UNMATCHED,
               request.method if request.method in _METHODS else "other", status_class(status))
        children = self._http_children.get(key)
        if children is None:
            template, method, status_label = key
            children = self._http_children[key] = (self.http_requests.labels(template, method, status_label),
                                                   self.http_duration.labels(template, method),
                                                   self.http_bytes.labels(template))
        requests, duration, sent = children
        requests.inc()
        duration.observe(elapsed)
        if request.bytes_sent:
            sent.inc(request.bytes_sent)
        record = request.generation
        if record is not None:
            self.generation_finished(record, status)

    def generation_finished(self, record: GenerationRecord, status: int) -> None:
        """Count one generation: a finished request's (above), or one with no HTTP request of
        its own (a run's, a batch line's, a resumable stream's: runnel.surfaces.openai.offline)."""
        key = (self.app_name(record.app), outcome(record, status))
        children = self._generation_children.get(key)
        if children is None:
            app, reason = key
            children = self._generation_children[key] = (
                self.generation_requests.labels(app, reason), self.prompt_tokens.labels(app),
                self.generated_tokens.labels(app), self.ttft.labels(app), self.e2e.labels(app), self.itl.labels(app))
        requests, prompt_tokens, generated_tokens, ttft_histogram, e2e_histogram, itl_histogram = children
        requests.inc()
        if key[1] in _NEVER_STARTED:
            return  # nothing was computed
        prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            generated_tokens.inc(record.completion_tokens)
        ttft = record.time_to_first_token
        if ttft is not None:
            ttft_histogram.observe(ttft)
        if record.ended_at and not record.failed:
            e2e_histogram.observe(record.ended_at - record.started_at)
            itl = record.inter_token_latency
            if itl is not None:
                itl_histogram.observe(itl)

    def app_name(self, app: Any) -> str:
        for name, candidate in self._apps.items():  # a handful of apps: cheaper than keeping a map in step
            if candidate is app:
                return name
        return str(getattr(app, "model_id", "unknown"))


class RunMetrics:
    """What runnel.runs.Runner reports (it calls these at the points a run changes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.accepted = Counter("runnel_runs_accepted", "Async runs recorded and queued", ("app",),
                                registry=registry)
        self.finished = Counter("runnel_runs_finished", "Async runs that reached a terminal state", ("app", "state"),
                                registry=registry)
        self.duration = Histogram("runnel_run_duration_seconds", "Execution time of finished runs (those that "
                                  "ran)", ("app",), buckets=RUN_DURATION_BUCKETS, registry=registry)
        self.webhooks = Counter("runnel_webhook_deliveries", "Webhooks by outcome: delivered, failed (given up "
                                "after its attempts), refused (host not allowed)", ("outcome",), registry=registry)
        self.recovered = Counter("runnel_runs_recovered", "Runs a dead runner left, found at start or later: "
                                 "requeued (idempotent apps) or failed (interrupted)", ("outcome",),
                                 registry=registry)

    def run_accepted(self, app: str) -> None:
        self.accepted.labels(app).inc()

    def run_finished(self, app: str, state: str, seconds: float | None) -> None:
        self.finished.labels(app, state).inc()
        if seconds is not None:
            self.duration.labels(app).observe(seconds)

    def runs_recovered(self, requeued: int, failed: int) -> None:
        if requeued:
            self.recovered.labels("requeued").inc(requeued)
        if failed:
            self.recovered.labels("failed").inc(failed)

    def webhook_outcome(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()


class NoRunMetrics:
    """The Runner's metrics when nobody reads them (a Runner made outside a Server)."""

    def run_accepted(self, app: str) -> None:
        pass

    def run_finished(self, app: str, state: str, seconds: float | None) -> None:
        pass

    def runs_recovered(self, requeued: int, failed: int) -> None:
        pass

    def webhook_outcome(self, outcome: str) -> None:
        pass


class LiveState:
    """A prometheus_client collector: gauges read from the server's own state at scrape time."""

    def __init__(self, apps: AppRegistry) -> None:
        self.apps = apps
        self.server_state: ServerState | None = None
        self.runner: Runner | None = None

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the apps

    def collect(self) -> Iterator[Metric]:
        state = self.server_state
        if state is not None:
            connections = state.connections
            yield _gauge("runnel_http_connections_open", "Connections open (being served)",
                         len(connections) - state.refusing)
            yield _gauge("runnel_http_requests_in_flight", "Requests received and not yet answered in full",
                         sum(1 for connection in connections if connection.busy))
            refused = CounterMetricFamily("runnel_http_connections_rejected", "Connections answered 503 and closed "
                                          "at once: past [server] max_connections")
            refused.add_metric((), state.refused_total)
            yield refused
        ready = GaugeMetricFamily("runnel_app_ready", "1 when the app serves, else 0 (loading, failed)",
                                  labels=("app",))
        waiting = GaugeMetricFamily("runnel_generation_waiting_rows", "Rows (choices) admitted and waiting for "
                                    "a batch", labels=("app",))
        running = GaugeMetricFamily("runnel_generation_running_rows", "Rows (choices) decoding now",
                                    labels=("app",))
        sizes = HistogramMetricFamily("runnel_generation_batch_size_rows", "Rows per batch launched",
                                      labels=("app",))
        folds = CounterMetricFamily("runnel_generation_folds", FOLDS_HELP, labels=("app",))
        folded = CounterMetricFamily("runnel_generation_folded_rows", FOLDED_ROWS_HELP, labels=("app",))
        for name, app in self.apps.items():
            ready.add_metric((name,), 1.0 if self.apps.state(name) == "ready" else 0.0)
            report: Callable[[], Mapping[str, Any] | None] | None = getattr(app, "batching_stats", None)
            stats = report() if callable(report) else None
            if not stats:
                continue
            waiting.add_metric((name,), stats["waiting_rows"])
            running.add_metric((name,), stats["running_rows"])
            buckets, total = _size_buckets(stats["batch_sizes"])
            sizes.add_metric((name,), buckets, total)
            if "folds" in stats:  # a batcher that folds waiting rows into running batches
                folds.add_metric((name,), stats["folds"])
                folded.add_metric((name,), stats["folded_rows"])
        yield ready
        yield waiting
        yield running
        yield sizes
        yield folds
        yield folded
        runner = self.runner
        if runner is not None:
            yield _gauge("runnel_runs_queued", "Runs waiting in this server's queue", runner.queued)
            yield _gauge("runnel_runs_running", "Runs executing now", runner.busy)


class LiveGauges:
    """A worker's ``LiveState`` copied into prometheus_client's multiprocess metrics (one
    process's files, summed by ``Metrics.render`` in whichever worker is scraped)."""

    def __init__(self, live: LiveState) -> None:
        self.live = live
        # Not in any registry: MultiProcessCollector reads them from their files.
        self.connections = Gauge("runnel_http_connections_open", "Connections open (being served)",
                                 registry=None, multiprocess_mode="livesum")
        self.in_flight = Gauge("runnel_http_requests_in_flight", "Requests received and not yet answered in full",
                               registry=None, multiprocess_mode="livesum")
        self.refused = Counter("runnel_http_connections_rejected", "Connections answered 503 and closed at once: "
                               "past [server] max_connections", registry=None)
        self.ready = Gauge("runnel_app_ready", "1 when the app serves on every worker, else 0", ("app",),
                           registry=None, multiprocess_mode="livemin")
        self.waiting = Gauge("runnel_generation_waiting_rows", "Rows (choices) admitted and waiting for a batch",
                             ("app",), registry=None, multiprocess_mode="livesum")
        self.running = Gauge("runnel_generation_running_rows", "Rows (choices) decoding now", ("app",),
                             registry=None, multiprocess_mode="livesum")
        self.sizes = Histogram("runnel_generation_batch_size_rows", "Rows per batch launched", ("app",),
                               buckets=BATCH_SIZE_BUCKETS, registry=None)
        self.folds = Counter("runnel_generation_folds", FOLDS_HELP, ("app",), registry=None)
        self.folded = Counter("runnel_generation_folded_rows", FOLDED_ROWS_HELP, ("app",), registry=None)
        self.runs_queued = Gauge("runnel_runs_queued", "Runs waiting in the workers' queues", registry=None,
                                 multiprocess_mode="livesum")
        self.runs_running = Gauge("runnel_runs_running", "Runs executing now", registry=None,
                                  multiprocess_mode="livesum")
        self._refused_seen = 0
        self._sizes_seen: dict[str, list[int]] = {}
        self._folds_seen: dict[tuple[str, str], int] = {}

    def copy_ready(self, name: str, state: str | None) -> None:
        self.ready.labels(name).set(1.0 if state == "ready" else 0.0)

    def refresh(self) -> None:
        live = self.live
        state = live.server_state
        if state is not None:
            self.connections.set(len(state.connections) - state.refusing)
            self.in_flight.set(sum(1 for connection in state.connections if connection.busy))
            if state.refused_total > self._refused_seen:
                self.refused.inc(state.refused_total - self._refused_seen)
                self._refused_seen = state.refused_total
        for name, app in live.apps.items():
            self.copy_ready(name, live.apps.state(name))
            report: Callable[[], Mapping[str, Any] | None] | None = getattr(app, "batching_stats", None)
            stats = report() if callable(report) else None
            if not stats:
                continue
            self.waiting.labels(name).set(stats["waiting_rows"])
            self.running.labels(name).set(stats["running_rows"])
            counts = stats["batch_sizes"]
            seen = self._sizes_seen.setdefault(name, [])
            seen.extend([0] * (len(counts) - len(seen)))
            histogram = self.sizes.labels(name)
            for size, count in enumerate(counts):
                for _ in range(count - seen[size]):  # the batches launched since the last copy
                    histogram.observe(size)
                seen[size] = count
            for key, counter in (("folds", self.folds), ("folded_rows", self.folded)):
                seen_folds = self._folds_seen.get((name, key), 0)
                if stats.get(key, 0) > seen_folds:  # the folds since the last copy
                    counter.labels(name).inc(stats[key] - seen_folds)
                    self._folds_seen[name, key] = stats[key]
        runner = live.runner
        if runner is not None:
            self.runs_queued.set(runner.queued)
            self.runs_running.set(runner.busy)


class _WorkersCollector(MultiProcessCollector):
    """prometheus_client's sum over the workers' files, minus a race it loses: a worker that has
    just created a metric's file (empty until it is sized) fails the whole scrape with
    struct.error, and one whose files the supervisor removes as it died, with
    FileNotFoundError. An empty file holds no values yet: it is skipped; a file gone between
    listing and reading: the files are listed again (a few times at most)."""

    def collect(self) -> Iterator[Metric]:
        for attempt in range(3):
            files = []
            for name in glob.glob(os.path.join(self._path, "*.db")):
                with contextlib.suppress(OSError):
                    if os.path.getsize(name) > 0:
                        files.append(name)
            try:
                return self.merge(files, accumulate=True)
            except (FileNotFoundError, struct.error):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _size_buckets(counts: Sequence[int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets and the sum from ``counts[k]`` = batches of k rows."""
    buckets: list[tuple[str, float]] = []
    cumulative, total, bound_index = 0, 0, 0
    bounds = BATCH_SIZE_BUCKETS
    for size, count in enumerate(counts):
        while bound_index < len(bounds) and size > bounds[bound_index]:
            buckets.append((str(float(bounds[bound_index])), cumulative))
            bound_index += 1
        cumulative += count
        total += size * count
    while bound_index < len(bounds):
        buckets.append((str(float(bounds[bound_index])), cumulative))
        bound_index += 1
    buckets.append(("+Inf", cumulative))
    return buckets, total
