"""The load generator: trio tasks speaking HTTP/1.1 through h11, loopback only.

Closed loop (``LoadSpec.concurrency``): N clients, each on its own keep-alive
connection, each sending its next request as soon as the previous answer ends.
Open loop (``LoadSpec.rate``): one scheduler draws exponential inter-arrival times
(Poisson arrivals, seeded so every run offers the same pattern) and starts one task
per arrival; a task takes an idle connection from a pool or opens a new one and
gives it back when the answer ends with the connection still usable. Past
``IN_FLIGHT_CAP`` tasks in flight an arrival is counted as a "dropped" error.

Timing (``time.perf_counter_ns``): a request's clock starts when it is due (closed
loop: when its client is free to send; open loop: its scheduled arrival, so a late
client or a slow connect shows as latency rather than hiding it) and every event
takes the time of the socket read that delivered it. Latency ends at the read
holding the response's end; TTFT ends at the read holding the first token;
inter-token latency is the gap between the reads of consecutive token-bearing
events (0 when two arrive in one read). The window measured is
``[start + warmup, start + warmup + duration]``, where the warmup ends early once
it has sent a tenth of ``max_requests`` (so ``max_requests=50`` measures 45 rather
than none): a request counts when it ends in it; at the window's end, requests still in flight are cancelled (counted in
``in_flight_at_end``, not as errors). A run also ends when ``max_requests``
(warmup included) have been sent and answered. Output-token throughput is counted by
arrival instead (``sse.TokenWindow``): every token read inside the window counts, so a
request that takes longer than the window still shows its tokens. The per-request
metrics (TTFT, TPOT, E2EL, goodput) are defined in ``metrics``.

Client ceiling (2026-11, this 2-core machine, ``python -m benchmarks.loadgen.ceiling``:
a server that writes canned bytes, on the other core; the machine was shared with
other work, so ranges over several runs). Client CPU per request, and what one
free core can therefore drive:
- GET, small JSON answer, closed loop c=8: 90-155 us -> 6.5k-11k requests/s
  (h11's client cycle alone is ~40 us; the loopback write ~25 us);
- SSE, 64 OpenAI chunks each in its own HTTP chunk (runnel's framing), c=8:
  640-940 us -> 70k-100k tokens/s; h11's chunked reader is ~7 us per chunk, the
  SSE split and one ``orjson.loads`` ~1.7 us per event;
- GET, open loop at 2000/s: 190-290 us (a task, a timer and a wake-up each).
So a server measured near these rates is measured against the client too: compare
``client_cpu_s`` with ``wall_s`` in the report.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import resource
import socket
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import h11
import orjson
import trio

from .dataset import Sample
from .metrics import SLO_KEYS, meets, request_metrics
from .report import format_progress
from .sse import StreamTokens, TokenWindow, usage_counts
from .stats import summarize

READ_SIZE = 64 * 1024
IN_FLIGHT_CAP = 10_000  # open loop: arrivals past this many requests in flight are dropped
MAX_CONCURRENCY = 10_000
MAX_BODY_SCAN = 1 << 20  # non-stream 2xx bodies up to this size are scanned for "usage"
WARMUP_SHARE = 0.1  # the warmup ends early once it has sent this share of max_requests
ARRIVAL_SEED = 20261101
CONNECT_BACKOFF = 0.01  # a client whose connect failed waits this long before the next try
USER_AGENT = "runnel-loadgen/0.2"

perf_counter_ns = time.perf_counter_ns


def parse_url(url: str, allow_remote: bool = False) -> tuple[str, int, str, str]:
    """(address to connect to, port, request target, Host header) of an http URL on
    loopback; ValueError for anything else. ``localhost`` connects to 127.0.0.1.
    ``allow_remote`` lets any host through (a name is resolved when connecting): a
    load generator aimed at someone else's server by a typo is an attack, so it is
    asked for by name."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"credentials in the URL are not supported: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    refused = ValueError(
        f"{host!r} is not a loopback address: the load generator only sends to "
        "127.0.0.1, ::1 or localhost unless asked (--allow-remote, allow_remote=True)"
    )
    if host == "localhost":
        address = "127.0.0.1"
    elif allow_remote:
        address = host
    else:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise refused from None
        if not ip.is_loopback:
            raise refused
        address = str(ip)
    port = parts.port or 80  # .port raises ValueError for a bad port
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return address, port, target, parts.netloc


@dataclass
class Workload:
    """One request, sent over and over; or, with ``bodies``, each body in turn (then
    ``body`` is ignored). ``url`` must be on loopback (ValueError) unless
    ``allow_remote``.

    ``stream``: parse the answer as SSE (``Accept: text/event-stream`` is added
    unless given) and count tokens: for OpenAI chunks the choices whose
    ``delta.content`` / ``text`` is non-empty, for other SSE every data event but
    ``[DONE]``; record TTFT and inter-token gaps; a stream's ``usage.completion_tokens``
    (OpenAI's ``stream_options.include_usage``), when it has one, is its output token
    count. Without ``stream``, a 2xx JSON body with ``usage.completion_tokens`` counts
    those tokens.
    """

    url: str
    method: str = "GET"
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: bool = False
    bodies: list[bytes] | None = None
    allow_remote: bool = False

    def __post_init__(self) -> None:
        parse_url(self.url, self.allow_remote)
        self.method = self.method.upper()
        if isinstance(self.body, str):
            self.body = self.body.encode()
        if self.bodies is not None and not self.bodies:
            raise ValueError("bodies, when given, must not be empty")

    @classmethod
    def openai_chat(cls, base_url, model, prompt, max_tokens, stream, **extra) -> Workload:
        """POST ``{base_url}/chat/completions`` with one user message; ``extra`` goes into
        the body (e.g. ``ignore_eos=True``, ``temperature=0``). A base URL with no
        path means ``/v1``."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": stream,
            **extra,
        }
        return cls._openai(base_url, "chat/completions", body, stream)

    @classmethod
    def openai_completion(cls, base_url, model, prompt, max_tokens, stream, **extra) -> Workload:
        """POST ``{base_url}/completions`` (legacy completions); as ``openai_chat``."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, **extra}
        return cls._openai(base_url, "completions", body, stream)

    @classmethod
    def openai(cls, base_url: str, model: str, samples: list[Sample], *, chat: bool = False, stream: bool = True,
               api_key: str | None = None, allow_remote: bool = False, **extra) -> Workload:
        """One request per sample (cycled): ``POST {base_url}/completions`` with the
        sample's prompt, or ``/chat/completions`` with it as the user message
        (``chat``); ``max_tokens`` is the sample's output length. Streams ask for
        usage (``stream_options.include_usage``) so that output tokens are the
        server's count. ``api_key`` is sent as ``Authorization: Bearer``; ``extra``
        goes into every body (e.g. ``ignore_eos=True``, ``temperature=0``)."""
        if not samples:
            raise ValueError("no samples to send")
        options = {"stream": bool(stream)}
        if stream:
            options["stream_options"] = {"include_usage": True}
        bodies = []
        for sample in samples:
            content = ({"messages": [{"role": "user", "content": sample.prompt}]} if chat
                       else {"prompt": sample.prompt})
            bodies.append(orjson.dumps({"model": model, **content, "max_tokens": sample.output_tokens,
                                        **options, **extra}))
        workload = cls._openai(base_url, "chat/completions" if chat else "completions", {}, stream, allow_remote)
        workload.body, workload.bodies = bodies[0], bodies
        if api_key:
            workload.headers.append(("authorization", f"Bearer {api_key}"))
        return workload

    @classmethod
    def _openai(cls, base_url: str, endpoint: str, body: dict, stream: bool, allow_remote: bool = False) -> Workload:
        base = base_url.rstrip("/")
        if not urlsplit(base).path:
            base += "/v1"
        return cls(
            url=f"{base}/{endpoint}",
            method="POST",
            body=orjson.dumps(body),
            headers=[("content-type", "application/json")],
            stream=bool(stream),
            allow_remote=allow_remote,
        )


@dataclass
class LoadSpec:
    """How hard and how long: exactly one of ``concurrency`` (closed loop) and
    ``rate`` (open loop, requests/s). Every run is bounded by ``warmup + duration``
    seconds and by ``max_requests`` requests (warmup included)."""

    concurrency: int | None = None
    rate: float | None = None
    duration: float = 10.0
    max_requests: int = 100_000
    warmup: float = 1.0
    timeout: float = 30.0
    progress: bool = False
    burstiness: float = 1.0
    goodput: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number")
        for name in ("duration", "timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if not (self.warmup >= 0 and math.isfinite(self.warmup)):
            raise ValueError("warmup must be >= 0 seconds")
        if not (isinstance(self.max_requests, int) and self.max_requests >= 1):
            raise ValueError("max_requests must be a positive integer")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError("burstiness must be a positive number (1 is Poisson)")
        for key, bound in (self.goodput or {}).items():
            if key not in SLO_KEYS or not (bound > 0 and math.isfinite(bound)):
                raise ValueError(f"goodput SLOs are {', '.join(SLO_KEYS)}: a positive number of ms each")


def arrival_offsets(rate: float, burstiness: float = 1.0, seed: int = ARRIVAL_SEED) -> Iterator[float]:
    """Open loop: when each request is due, in seconds from the start, as vLLM draws
    them: inter-arrival times from a gamma distribution of mean ``1 / rate`` and shape
    ``burstiness`` (1 is exponential, i.e. Poisson arrivals; below 1 burstier, above
    1 more even), from ``random.Random(seed)``."""
    rng = random.Random(seed)
    offset = 0.0
    if burstiness == 1.0:
        while True:
            offset += rng.expovariate(rate)
            yield offset
    scale = 1.0 / (rate * burstiness)
    while True:
        offset += rng.gammavariate(burstiness, scale)
        yield offset


class _Failed(Exception):
    """A request failed; ``args[0]`` is the error kind."""


class _Stale(_Failed):
    """The connection was closed or reset before any byte of the answer came back:
    on a reused keep-alive connection the request is retried once on a new one."""


class _Conn:
    """One connection: the stream trio opened, and reads and writes on its file
    descriptor directly. trio's ``send_all`` yields to the scheduler even when the
    write completed and ``receive_some`` tries a read before it waits; here a request
    costs one write, then one wait and one read per arrival of data, which is most
    of what the client spends per request after h11."""

    __slots__ = ("stream", "fd", "h11", "ready")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.h11 = h11.Connection(h11.CLIENT)
        self.ready = False  # the last read filled the buffer: more is likely waiting

    async def send(self, data: bytes) -> None:
        fd = self.fd
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)

    async def receive(self) -> bytes:
        fd = self.fd
        if self.ready:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                pass
            else:
                self.ready = len(data) == READ_SIZE
                return data
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            self.ready = len(data) == READ_SIZE
            return data

    def close(self) -> None:
        # Synchronous (trio's aclose is this plus a checkpoint), so it works in a
        # cancelled scope too; it wakes any task waiting on the descriptor.
        self.stream.socket.close()


class _Run:
    """The state of one run: the prepared requests, counters, and samples (arrays of
    floats in ms, appended only for requests that end in the window)."""

    def __init__(self, workload: Workload, spec: LoadSpec) -> None:
        self.workload = workload
        self.spec = spec
        self.address, self.port, target, host_header = parse_url(workload.url, workload.allow_remote)
        names = {name.lower() for name, _ in workload.headers}
        headers = []
        if "host" not in names:
            headers.append(("host", host_header))
        if "user-agent" not in names:
            headers.append(("user-agent", USER_AGENT))
        if workload.stream and "accept" not in names:
            headers.append(("accept", "text/event-stream"))
        if (workload.body is not None or workload.bodies) and "content-type" not in names:
            headers.append(("content-type", "application/json"))
        sized = "content-length" not in names and "transfer-encoding" not in names
        # h11 event objects are immutable: built (and validated) once per body, sent every time.
        self.requests = []
        for body in workload.bodies or [workload.body]:
            length = [("content-length", str(len(body)))] if body is not None and sized else []
            events = [h11.Request(method=workload.method, target=target, headers=headers + length + workload.headers)]
            if body:
                events.append(h11.Data(data=body))
            events.append(h11.EndOfMessage())
            self.requests.append(events)
        self.turn = 0  # the index in ``requests`` of the next request's events
        self.stream = workload.stream
        self.timeout = spec.timeout

        self.sent = 0
        self.in_flight = 0
        self.cut = 0
        self.ok = 0
        self.tokens = 0  # output tokens of the requests that ended in the window
        self.input_tokens = 0  # their prompt tokens, where the server reported them
        self.token_events = 0  # of those, the token-bearing pieces read (streams)
        self.good = 0  # requests that met every goodput SLO
        self.slos = spec.goodput
        self.window = TokenWindow()  # output tokens by arrival time; starts with the measuring
        self.nbytes = 0
        self.errors: dict[str, int] = {}
        self.latency = array("d")  # E2EL
        self.ttft = array("d")
        self.tpot = array("d")
        self.itl = array("d")
        self.idle: list[_Conn] = []
        self.cap = IN_FLIGHT_CAP
        self.warm_quota = int(spec.max_requests * WARMUP_SHARE)
        self.deadline: trio.CancelScope | None = None  # the run's
        self.t0 = self.warm_end = self.end = 0

    def take(self) -> bool:
        """Claim one request of the ``max_requests`` budget. The request past the
        warmup's share of it ends the warmup early (and moves the window with it)."""
        sent = self.sent
        if sent >= self.spec.max_requests:
            return False
        if sent == self.warm_quota:
            now = perf_counter_ns()
            if now < self.warm_end:
                self.warm_end = self.window.start = now
                self.deadline.deadline = trio.current_time() + self.spec.duration
        self.sent = sent + 1
        return True

    def fail(self, kind: str, when: int) -> None:
        if when >= self.warm_end:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    async def connect(self) -> _Conn:
        stream = await trio.open_tcp_stream(self.address, self.port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return _Conn(stream)

    async def request(self, conn: _Conn | None, due: int) -> _Conn | None:
        """Send one request on ``conn`` (or a new connection) and record the outcome.
        Returns the connection when it can carry the next request, else None."""
        kind = None
        result = None
        events = self.requests[self.turn]
        self.turn = (self.turn + 1) % len(self.requests)
        try:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    if conn is not None:
                        try:
                            result = await self.roundtrip(conn, events)
                        except _Stale:
                            conn.close()
                            conn = None
                    if conn is None:
                        try:
                            conn = await self.connect()
                        except OSError:
                            kind = "connect"
                        else:
                            result = await self.roundtrip(conn, events)
                except _Failed as exc:
                    kind = exc.args[0]
                except OSError:
                    kind = "reset"
                except ValueError:  # an SSE line past MAX_LINE
                    kind = "protocol"
        except trio.Cancelled:  # the end of the window (not the timeout: that is caught)
            if conn is not None:
                conn.close()
            self.cut += 1
            raise
        if scope.cancelled_caught:
            kind = "timeout"
        if kind is not None:
            self.fail(kind, perf_counter_ns())
            if conn is not None:
                conn.close()
            if kind == "connect":
                await trio.sleep(CONNECT_BACKOFF)
            return None
        status, sse, tokens, prompt_tokens, nbytes, t_end, stream_error, reusable = result
        if sse is not None:
            tokens, prompt_tokens = sse.output_tokens, sse.prompt_tokens
            self.window.settle(sse.tokens, sse.windowed, sse.reported, t_end)
        elif tokens:
            self.window.settle(0, 0, tokens, t_end)
        if t_end >= self.warm_end:
            self.nbytes += nbytes
            if not 200 <= status < 300:
                self.fail(f"status_{status}", t_end)
            elif stream_error is not None:
                self.fail(stream_error, t_end)
            else:
                self.ok += 1
                self.tokens += tokens
                self.input_tokens += prompt_tokens or 0
                ttft, tpot, e2el = request_metrics(due, sse.first if sse is not None else 0, t_end, tokens)
                self.latency.append(e2el)
                if ttft is not None:
                    self.ttft.append(ttft)
                    self.itl.extend(sse.gaps)
                    self.token_events += sse.tokens
                if tpot is not None:
                    self.tpot.append(tpot)
                if self.slos and meets(self.slos, ttft, tpot, e2el):
                    self.good += 1
        if reusable:
            return conn
        conn.close()
        return None

    async def roundtrip(self, conn: _Conn, events: list):
        """One request/response cycle on ``conn``; raises _Failed (or a socket error)."""
        h = conn.h11
        out = b"".join([h.send(event) for event in events])
        try:
            await conn.send(out)
        except OSError:  # EPIPE, ECONNRESET: the server closed the connection
            raise _Stale("closed") from None
        receive = conn.receive
        next_event = h.next_event
        NEED_DATA, Data = h11.NEED_DATA, h11.Data
        status = 0
        nbytes = 0
        t = 0
        sse = None  # StreamTokens of a 2xx SSE answer
        parts: list[bytes] = []  # its body bytes from the last read, one piece per chunk
        body = None  # the body of a 2xx answer not streamed
        stream_error = None
        eof = False
        try:
            while True:
                event = next_event()
                if event is NEED_DATA:
                    if parts:  # all from the read at t: parsed at once, not per chunk
                        sse.feed(b"".join(parts), t)
                        parts.clear()
                    try:
                        data = await receive()
                    except OSError:
                        if not nbytes:
                            raise _Stale("closed") from None
                        raise
                    t = perf_counter_ns()
                    if not data:
                        if not nbytes:
                            raise _Stale("closed")
                        eof = True
                    nbytes += len(data)
                    h.receive_data(data)
                    continue
                cls = type(event)
                if cls is Data:
                    if sse is not None:
                        parts.append(event.data)
                    elif body is not None and len(body) < MAX_BODY_SCAN:
                        body += event.data
                elif cls is h11.Response:
                    status = event.status_code
                    if 200 <= status < 300:
                        if self.stream:
                            ctype = _header(event.headers, b"content-type")
                            if ctype.startswith(b"text/event-stream"):
                                sse = StreamTokens(self.window)
                            else:
                                stream_error = "not_sse"
                        else:
                            body = bytearray()
                elif cls is h11.EndOfMessage:
                    if parts:
                        sse.feed(b"".join(parts), t)
                    break
                elif cls is h11.ConnectionClosed:
                    raise _Failed("closed")
                # InformationalResponse (1xx): nothing to do
        except h11.RemoteProtocolError:
            raise _Failed("closed" if eof else "protocol") from None
        reusable = h.our_state is h11.DONE and h.their_state is h11.DONE
        if reusable:
            h.start_next_cycle()
        if sse is not None:
            if sse.error:
                stream_error = "stream_error"
            return status, sse, 0, None, nbytes, t, stream_error, reusable
        tokens, prompt_tokens = _usage_tokens(body) if body and b'"usage"' in body else (0, None)
        return status, None, tokens, prompt_tokens, nbytes, t, stream_error, reusable

    async def client(self) -> None:
        """Closed loop: one client, one connection at a time, back to back."""
        conn = None
        try:
            while self.take():
                self.in_flight += 1
                try:
                    conn = await self.request(conn, perf_counter_ns())
                finally:
                    self.in_flight -= 1
        finally:
            if conn is not None:
                conn.close()

    async def arrivals(self, nursery: trio.Nursery, start: float) -> None:
        """Open loop: arrivals at ``spec.rate`` (``arrival_offsets``), one task each."""
        offsets = arrival_offsets(self.spec.rate, self.spec.burstiness)
        while self.sent < self.spec.max_requests:
            offset = next(offsets)
            await trio.sleep_until(start + offset)
            self.take()  # after the sleep: an arrival the window's end cuts off was never sent
            due = self.t0 + int(offset * 1e9)
            if self.in_flight >= self.cap:
                self.fail("dropped", due)
                continue
            self.in_flight += 1
            nursery.start_soon(self.pooled, due)

    async def pooled(self, due: int) -> None:
        try:
            conn = await self.request(self.idle.pop() if self.idle else None, due)
            if conn is not None:
                self.idle.append(conn)
        finally:
            self.in_flight -= 1

    async def show_progress(self) -> None:
        spec = self.spec
        try:
            while True:
                now = perf_counter_ns()
                elapsed = (now - self.t0) * 1e-9
                total = (self.warm_end - self.t0) * 1e-9 + spec.duration
                window = max(0.0, (now - self.warm_end) * 1e-9)
                sys.stderr.write(
                    "\r" + format_progress(elapsed, total, now < self.warm_end, self.sent,
                                           spec.max_requests, self.ok, sum(self.errors.values()),
                                           self.ok / window if window > 0 else 0.0, self.in_flight)
                )
                sys.stderr.flush()
                await trio.sleep(0.2)
        finally:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()

    def report(self, cpu_s: float) -> dict:
        w = self.workload
        duration = max(0.0, (self.end - self.warm_end) * 1e-9)
        report = {
            "workload": {"url": w.url, "method": w.method, "stream": w.stream,
                         "bodies": len(self.requests)},
            "spec": asdict(self.spec),
            "mode": "closed" if self.spec.concurrency is not None else "open",
            "requests": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "duration_s": round(duration, 3),
            "requests_per_s": round(self.ok / duration, 2) if duration else 0.0,
            "tokens": self.tokens,
            "input_tokens": self.input_tokens,
            "tokens_per_s": round(self.window.tokens / duration, 2) if duration else 0.0,
            "completed_tokens_per_s": round(self.tokens / duration, 2) if duration else 0.0,
            "latency_ms": summarize(self.latency),
        }
        if w.stream:
            report["token_events"] = self.token_events
            report["ttft_ms"] = summarize(self.ttft)
            report["tpot_ms"] = summarize(self.tpot)
            report["itl_ms"] = summarize(self.itl)
        if self.slos:
            report["goodput"] = {"slo_ms": dict(self.slos), "requests": self.good,
                                 "requests_per_s": round(self.good / duration, 2) if duration else 0.0}
        report["bytes_received"] = self.nbytes
        report["sent"] = self.sent
        report["in_flight_at_end"] = self.cut
        report["client_cpu_s"] = round(cpu_s, 3)
        report["wall_s"] = round((self.end - self.t0) * 1e-9, 3)
        return report


def _header(headers, name: bytes) -> bytes:
    for key, value in headers:
        if key == name:
            return value
    return b""


def _usage_tokens(body: bytes) -> tuple[int, int | None]:
    """(completion tokens, prompt tokens) of a JSON body's ``usage``; (0, None) without one."""
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return 0, None
    if type(usage) is not dict:
        return 0, None
    out, prompt = usage_counts(usage)
    return out or 0, prompt


def _open_files_for(n: int) -> int:
    """Raise the soft open-files limit towards ``n`` if needed; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        new = n if hard == resource.RLIM_INFINITY else min(n, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return n if soft == resource.RLIM_INFINITY else soft


async def load(workload: Workload, spec: LoadSpec) -> dict:
    """Run ``spec``'s load of ``workload`` (in trio) and return the report dict."""
    workload.__post_init__()  # re-check fields changed since construction
    spec.__post_init__()
    run = _Run(workload, spec)
    limit = _open_files_for((spec.concurrency or IN_FLIGHT_CAP) + 128)
    if spec.concurrency is not None and spec.concurrency > limit - 64:
        raise ValueError(f"concurrency {spec.concurrency} needs more open files than the limit ({limit})")
    run.cap = min(IN_FLIGHT_CAP, limit - 64)
    cpu0 = time.process_time()
    start = trio.current_time()
    run.t0 = perf_counter_ns()
    run.warm_end = run.window.start = run.t0 + int(spec.warmup * 1e9)
    try:
        async with trio.open_nursery() as outer:
            if spec.progress:
                outer.start_soon(run.show_progress)
            with trio.CancelScope(deadline=start + spec.warmup + spec.duration) as run.deadline:
                async with trio.open_nursery() as nursery:
                    if spec.concurrency is not None:
                        for _ in range(spec.concurrency):
                            nursery.start_soon(run.client)
                    else:
                        nursery.start_soon(run.arrivals, nursery, start)
            run.end = min(perf_counter_ns(), run.warm_end + int(spec.duration * 1e9))
            outer.cancel_scope.cancel()
    finally:
        for conn in run.idle:
            conn.close()
        run.idle.clear()
    return run.report(time.process_time() - cpu0)


def run_load(workload: Workload, spec: LoadSpec) -> dict:
    """``load`` from synchronous code: one ``trio.run``."""
    return trio.run(load, workload, spec)
