"""``Idempotency-Key``: a retried request finds the run its first try made.

A client that lost its connection before it saw the answer cannot know whether its
run was recorded; sending the same ``Idempotency-Key`` again gets that run instead
of a second one. A key is scoped to who sent it and where (the principal, the
surface's route, the app and function), so two clients, or two routes, never share
one; the store keeps the scoped key unique (``runnel.runs.store.Run.idempotency_key``)
for as long as it keeps the run (``[server] runs_retention`` after it finished). A key
sent again with a different request is refused (422 from ``Runner.submit``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import HTTPError

__all__ = ["HEADER", "MAX_KEY_BYTES", "Idempotency", "idempotency_of"]

HEADER = b"idempotency-key"
MAX_KEY_BYTES = 255


@dataclass(frozen=True, slots=True)
class Idempotency:
    key: str  # sha256 hex of (principal, scope, the client's key): what the store keeps unique
    request_hash: str  # sha256 hex of what the run is made from


def idempotency_of(request, scope: str, request_parts: Any) -> Idempotency | None:
    """The request's ``Idempotency-Key`` scoped to its principal and ``scope`` (the route:
    surface, app, function), with a digest of ``request_parts`` (everything the run is
    made from, as JSON); None when the header is absent. HTTPError 400 for a key that is
    empty, longer than MAX_KEY_BYTES or not printable ASCII."""
    key = request.header(HEADER)
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_BYTES or not all(0x20 <= byte < 0x7F for byte in key) or not key.strip():
        raise HTTPError(400, f"Idempotency-Key must be 1 to {MAX_KEY_BYTES} printable ASCII characters",
                        param="Idempotency-Key", code="invalid_idempotency_key")
    principal = request.principal.identity
    scoped = hashlib.sha256(orjson.dumps([principal, scope, key.decode()])).hexdigest()
    digest = hashlib.sha256(orjson.dumps(request_parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return Idempotency(scoped, digest)
