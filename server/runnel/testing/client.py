"""A raw HTTP/1.1 client on h11: one keep-alive connection, requests and whole replies."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import h11
import orjson

from .wire import connect


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    header_list: list = field(default_factory=list)
    reason: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    def json(self):
        return orjson.loads(self.body)


Headers = Iterable[tuple[str, str]]


class H11Client:
    """A raw HTTP/1.1 client on h11 over one keep-alive connection."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = connect(port, host, timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, method: str, target: str, *, headers: Headers = (), body: bytes | None = None) -> None:
        all_headers = [("host", "127.0.0.1"), *headers]
        if body is not None:
            all_headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(data)

    def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.conn.receive_data(data)
                continue
            return event

    def receive(self) -> Reply:
        """The next complete response (informational responses skipped)."""
        while True:
            event = self.next_event()
            if type(event) is h11.Response:
                break
            if type(event) is h11.ConnectionClosed:
                raise ConnectionError("server closed the connection")
        body = []
        while True:
            item = self.next_event()
            if type(item) is h11.Data:
                body.append(bytes(item.data))
            elif type(item) is h11.EndOfMessage:
                break
        headers = {name: value for name, value in event.headers}
        reply = Reply(event.status_code, headers, b"".join(body), list(event.headers), bytes(event.reason))
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return reply

    def request(self, method: str, target: str, *, headers: Headers = (), body: bytes | None = None) -> Reply:
        self.send(method, target, headers=headers, body=body)
        return self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H11Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(port: int, method: str, target: str, *, headers: Headers = (), body: bytes | None = None) -> Reply:
    """One request on a fresh connection."""
    with H11Client(port) as client:
        return client.request(method, target, headers=headers, body=body)
