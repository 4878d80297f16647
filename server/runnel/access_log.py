"""Built-in plugin: one log line per finished request when ``[server] access_log`` is on.

``"text"`` (or ``true``): the one-line format runnel always had. ``"json"``: one JSON
object a line, for log pipelines, with the fields below. The request id is the one in
``X-Request-Id`` (the client's, when it sent a usable one). The principal is the
authenticated subject (an API key's short digest, a JWT's ``sub``), never a credential.
A generation's fields come from ``request.generation``, the record the metrics read too.

    {"time": "2026-11-27T16:00:00.123Z", "request_id": "...", "method": "POST",
     "route": "/v1/chat/completions", "path": "/v1/chat/completions", "status": 200,
     "duration_ms": 41.2, "bytes": 512, "client": "127.0.0.1:50412", "principal": "key:1a2b",
     "app": "tiny", "prompt_tokens": 12, "completion_tokens": 16, "ttft_ms": 9.1, "finish_reason": "stop"}

``bytes`` is the size of a whole response (head and body), null for a stream (streams are
never counted per token); ``route`` is the route's template, null when none matched;
status 499: the client went away before its response was complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from .hookspecs import hookimpl
from .metrics import outcome

logger = logging.getLogger("runnel.access")


class AccessLog:
    def __init__(self, log_format: str = "text", app_name: Callable[[Any], str] | None = None) -> None:
        self._json = log_format == "json"
        self._app_name = app_name or (lambda app: str(getattr(app, "model_id", "unknown")))

    @hookimpl
    def runnel_request_finished(self, request, status, elapsed):
        if not logger.isEnabledFor(logging.INFO):
            return
        client = request.client
        if not self._json:
            logger.info(
                '%s - "%s %s" %d %.1fms id=%s',
                f"{client[0]}:{client[1]}" if client else "-",
                request.method,
                request.target.decode("latin-1"),
                status,
                elapsed * 1000,
                request.request_id,
            )
            return
        logger.info("%s", orjson.dumps(self.fields(request, status, elapsed)).decode())

    def fields(self, request, status: int, elapsed: float) -> dict[str, Any]:
        client = request.client
        route = request.route
        principal = request.principal
        now = time.time()
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "request_id": request.request_id,
            "method": request.method,
            "route": route.template if route is not None else None,
            "path": request.path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "bytes": request.bytes_sent or None,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "principal": principal.subject if principal is not None else None,
        }
        record = request.generation
        if record is not None:
            ttft = record.time_to_first_token
            line["app"] = self._app_name(record.app)
            line["prompt_tokens"] = record.prompt_tokens
            line["completion_tokens"] = record.completion_tokens
            line["ttft_ms"] = round(ttft * 1000, 3) if ttft is not None else None
            line["finish_reason"] = outcome(record, status)  # as runnel_generation_requests_total counts it
        return line
