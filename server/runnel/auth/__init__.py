"""Who made a request: principals and the built-in authentication kinds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. ``kind`` names the auth kind that vouched for it."""

    subject: str
    kind: str
    claims: Mapping[str, Any] = field(default_factory=dict)


ANONYMOUS = Principal("anonymous", "none")

__all__ = ["ANONYMOUS", "Principal"]
