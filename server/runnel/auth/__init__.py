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
    """The authenticated caller. ``kind`` names the auth kind that vouched for it.

    ``identity`` is who owns what this caller creates (async runs, jobs: see
    ``runnel.runs``): two requests with the same identity are the same owner. Default
    ``"<kind>:<subject>"``; an auth kind whose subjects are not unique on their own
    says more (jwt: the project and the subject)."""

    subject: str
    kind: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    identity: str = ""

    def __post_init__(self) -> None:
        if not self.identity:
            object.__setattr__(self, "identity", f"{self.kind}:{self.subject}")


ANONYMOUS = Principal("anonymous", "none", identity="anonymous")  # runnel.runs.ANYONE


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
