"""Response heads, written by hand.

h11 parses requests; responses we encode ourselves. Sending through h11 costs
~20 us a response here (it re-validates every header and runs its state
machine), writing the same bytes ~1 us. Headers the server makes are known to
be valid; headers a handler adds are checked like h11 would.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus

STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %b\r\n" % (status.value, status.phrase.encode("ascii")) for status in HTTPStatus
}

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00\r\n]*")


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid status code {status}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


def encode_fields(headers: Iterable[tuple[bytes | str, bytes | str]]) -> bytes:
    """``name: value\\r\\n`` lines for handler-supplied headers, validated."""
    out = []
    for name, value in headers:
        if isinstance(name, str):
            name = name.encode("ascii")
        if isinstance(value, str):
            value = value.encode("latin-1")
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"invalid response header {name!r}: {value!r}")
        out.append(b"%b: %b\r\n" % (name, value))
    return b"".join(out)
