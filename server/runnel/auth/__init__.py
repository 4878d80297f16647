"""Who made a request: principals, and the built-in authentication kinds.

    none.py      kind "none": everyone is anonymous (the default)
    api_key.py   kind "api_key": Authorization: Bearer <key>, keys compared in constant time
    jwt.py       kind "jwt": a signed token, algorithms pinned, project claims checked

The dispatcher (runnel.dispatch) is the one caller of the runnel_authenticate hook
these implement; a route's policy says whether it is called at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. ``kind`` names the auth kind that vouched for it."""

    subject: str
    kind: str
    claims: Mapping[str, Any] = field(default_factory=dict)


ANONYMOUS = Principal("anonymous", "none")


def bearer_token(request) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    value = request.header(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


__all__ = ["ANONYMOUS", "Principal", "bearer_token"]
