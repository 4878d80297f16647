"""Webhooks: a finished run's body POSTed to a URL the caller named, signed, with retries.

A target must be an ``http://`` or ``https://`` URL whose host is listed in
``[server] webhook_allowed_hosts`` (an entry is a host name or address, matched
without regard to case, or ``host:port`` to allow one port only); nothing is
allowed by default, so the server cannot be made to POST wherever a caller likes.

With ``[server] webhook_secret`` set, each attempt carries

    X-Webhook-Timestamp: <unix seconds>
    X-Webhook-Signature: v1,<hex HMAC-SHA256(secret, "<run_id>.<timestamp>.<body>")>

so the receiver can check where the body came from, and how old it is.

Delivery makes up to ``ATTEMPTS`` attempts, ``webhook_retry_delay`` seconds apart:
it retries on a connection error (refused, reset, timed out, not HTTP) and on 404
(a receiver that is not deployed yet); any other status ends it: 2xx delivered,
anything else given up. The client is a small h11 one on asyncio streams: one
request per connection, the response's status line is all it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import ssl
import time
from urllib.parse import urlsplit

import h11

logger = logging.getLogger("runnel.webhooks")

__all__ = ["ATTEMPTS", "Webhooks", "check_target", "post", "sign"]

ATTEMPTS = 3
TIMEOUT = 10.0  # seconds for one attempt: connect, send, status line
USER_AGENT = "runnel-webhook"


def check_target(url: str, allowed_hosts) -> str:
    """``url`` when it may be a webhook target, else ValueError saying why."""
    if type(url) is not str or not url:
        raise ValueError("The webhook URL must be a non-empty string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"The webhook URL is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("The webhook URL must be an http:// or https:// URL with a host")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("The webhook URL must not contain spaces or control characters")
    host = parts.hostname.lower()
    allowed = {entry.lower().replace("[", "").replace("]", "") for entry in allowed_hosts}
    port = port or (443 if parts.scheme == "https" else 80)
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise ValueError(f"Webhook host {host!r} is not allowed on this server "
                         "(see [server] webhook_allowed_hosts)")
    return url


def sign(secret: str, run_id: str, timestamp: int, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value for this body."""
    message = f"{run_id}.{timestamp}.".encode() + body
    return "v1," + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


async def post(url: str, body: bytes, headers=(), *, timeout: float = TIMEOUT) -> int:
    """POST ``body`` (JSON) to ``url``; the response's status code.

    Raises OSError (TimeoutError included) or h11.ProtocolError when no HTTP
    response comes back.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context = ssl.create_default_context() if secure else None
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
            conn = h11.Connection(h11.CLIENT)
            head = [("host", parts.netloc.rpartition("@")[2]), ("user-agent", USER_AGENT),
                    ("content-type", "application/json"), ("content-length", str(len(body))),
                    ("connection", "close"), *headers]
            data = conn.send(h11.Request(method="POST", target=target, headers=head))
            if body:
                data += conn.send(h11.Data(data=body))
            writer.write(data + conn.send(h11.EndOfMessage()))
            await writer.drain()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif type(event) is h11.Response:
                    return event.status_code
                elif type(event) is h11.ConnectionClosed:
                    raise ConnectionError("the connection closed before a response")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


class Webhooks:
    """Delivers bodies with the configured secret and retry delay."""

    def __init__(self, secret: str = "", retry_delay: float = 2.0, *, attempts: int = ATTEMPTS,
                 timeout: float = TIMEOUT) -> None:
        self.secret = secret
        self.retry_delay = retry_delay
        self.attempts = attempts
        self.timeout = timeout

    def headers(self, run_id: str, body: bytes) -> list[tuple[str, str]]:
        headers = [("x-request-id", run_id)]
        if self.secret:
            timestamp = int(time.time())
            headers += [("x-webhook-timestamp", str(timestamp)),
                        ("x-webhook-signature", sign(self.secret, run_id, timestamp, body))]
        return headers

    async def deliver(self, url: str, run_id: str, body: bytes, extra_headers=()) -> bool:
        """POST until delivered or given up (see the module docstring); True when delivered.
        ``extra_headers``: the surface's own (``RunView.webhook_headers``), on every attempt."""
        host = urlsplit(url).hostname
        for attempt in range(1, self.attempts + 1):
            try:
                status = await post(url, body, [*self.headers(run_id, body), *extra_headers], timeout=self.timeout)
            except (OSError, h11.ProtocolError) as exc:
                outcome, retry = f"{type(exc).__name__}: {exc}", True
            else:
                if 200 <= status < 300:
                    logger.info("webhook for run %s delivered to %s (attempt %d)", run_id, host, attempt)
                    return True
                outcome, retry = f"HTTP {status}", status == 404
            if not retry or attempt == self.attempts:
                logger.warning("webhook for run %s to %s: attempt %d failed (%s); giving up",
                               run_id, host, attempt, outcome)
                return False
            logger.warning("webhook for run %s to %s: attempt %d failed (%s); retrying in %ss",
                           run_id, host, attempt, outcome, self.retry_delay)
            await asyncio.sleep(self.retry_delay)
        return False
