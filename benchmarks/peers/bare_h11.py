"""The ceiling for runnel's design: an asyncio.Protocol on uvloop driving h11, nothing else.

    python benchmarks/peers/bare_h11.py --port P

GET /v1/models answers a fixed small JSON body; POST /echo/{app} with
{"prompt", "max_tokens", "stream": true} streams the same SSE events as runnel's echo app,
one h11 send (and one transport write) per event, as a plain implementation would. No
routing table, no auth, no Date header, no per-request task: what is left is h11 and the loop.
"""

import argparse
import asyncio
import signal

import h11
import orjson
import uvloop

from common import MODELS, echo_events

MODELS_BODY = orjson.dumps(MODELS)
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(MODELS_BODY))]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class BareProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.conn = h11.Connection(h11.SERVER)
        self.request = None
        self.body = bytearray()

    def data_received(self, data):
        conn = self.conn
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body.clear()
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.respond()
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    self.transport.close()
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def respond(self):
        conn, write, request = self.conn, self.transport.write, self.request
        if request.method == b"GET" and request.target == b"/v1/models":
            write(conn.send(h11.Response(status_code=200, headers=JSON_HEADERS))
                  + conn.send(h11.Data(data=MODELS_BODY)) + conn.send(h11.EndOfMessage()))
        elif request.method == b"POST" and request.target.startswith(b"/echo/"):
            write(conn.send(h11.Response(status_code=200, headers=SSE_HEADERS)))
            for event in echo_events(orjson.loads(self.body)):
                write(conn.send(h11.Data(data=b"data: %b\n\n" % orjson.dumps(event))))
            write(conn.send(h11.EndOfMessage()))
        else:
            write(conn.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
                  + conn.send(h11.EndOfMessage()))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(BareProtocol, "127.0.0.1", port, backlog=2048))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
