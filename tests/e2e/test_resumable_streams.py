"""Resumable streams (``X-Runnel-Resumable: true``, runnel.surfaces.openai.resumable): a client
that drops a stream reattaches with ``Last-Event-ID`` and gets the rest, no gap, no duplicate;
without the header a disconnect still cancels. Also the Responses API's own form: background
responses streamed and resumed with ``starting_after`` (the openai SDK's flow), and, on a
shared Redis store, a stream reattached through another server.

The echo backend repeats its prompt's words, so a prompt of numbered words makes a stream
whose every event says where it belongs: "0 1 2 ... 199" with one missing or doubled is
plainly wrong. ``pace_ms`` keeps a generation going long enough to be followed live.
"""

from __future__ import annotations

import socket
import textwrap

import orjson
import pytest

from runnel.testing import ServeProcess, ServerThread, connect, read_head, request, send_post, server_config, wait_until

WORDS = 120
PROMPT = " ".join(str(n) for n in range(WORDS))
EXPECTED = PROMPT  # echo says its prompt back, word by word
CHAT = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": WORDS,
        "ignore_eos": True, "stream": True}
COMPLETION = {"model": "echo", "prompt": PROMPT, "max_tokens": WORDS, "ignore_eos": True, "stream": True}
RESUMABLE = {"X-Runnel-Resumable": "true"}
KEYS = ["first-key-0001", "second-key-002"]


def echo_config(**server) -> dict:
    return {"server": {"runs_path": "", **server}, "auth": {"kind": "api_key", "keys": KEYS},
            "apps": {"echo": {"backend": "echo", "pace_ms": 10, "max_generations": 1}}}


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


AUTH = ((b"authorization", f"Bearer {KEYS[0]}".encode()),)  # as runnel.testing.request takes headers


def parse_events(body: bytes) -> list[tuple[int | None, dict | str]]:
    """SSE events as (id, payload): the payload's JSON, or ``"[DONE]"``."""
    events = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        event_id = None
        data = None
        for line in block.split(b"\n"):
            name, _, value = line.partition(b": ")
            if name == b"id":
                event_id = int(value)
            elif name == b"data":
                data = value
        assert data is not None, block
        events.append((event_id, "[DONE]" if data == b"[DONE]" else orjson.loads(data)))
    return events


def text_of(events) -> str:
    parts = []
    for _, chunk in events:
        if chunk == "[DONE]" or not chunk["choices"]:
            continue
        choice = chunk["choices"][0]
        parts.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
    return "".join(parts)


def start_and_drop(port: int, path: str, body: dict, headers: dict[str, str], at_least: int):
    """Start a stream, read ``at_least`` events, drop the connection (a reset): its head and events."""
    sock = connect(port)
    try:
        send_post(sock, path, body, headers=headers)
        head = read_head(sock)
        assert head.status == 200, head.read_body()
        received = b""
        while len(parse_events(received)) < at_least or not received.endswith(b"\n\n"):
            chunk = head.next_chunk()
            assert chunk is not None, "the stream ended before the client dropped it"
            received += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        sock.close()
    return head, parse_events(received)


def reattach(port: int, path: str, headers: dict[str, str], last_event_id: int | None = None):
    extra = dict(headers)
    if last_event_id is not None:
        extra["Last-Event-ID"] = str(last_event_id)
    return request(port, "GET", path, headers=tuple((k.lower().encode(), v.encode()) for k, v in extra.items()))


def reattach_chunks(port: int, path: str, headers: dict[str, str], last_event_id: int) -> list[bytes]:
    """Reattach on a raw socket: the body's chunks as written (a live follow writes one per burst)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n{extra}last-event-id: {last_event_id}\r\n\r\n".encode())
        reply = read_head(sock)
        assert reply.status == 200 and reply.header(b"content-type") == b"text/event-stream"
        return reply.read_chunks()


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(server_config(echo_config())).start()
    assert thread.wait_ready()
    yield thread
    thread.stop()


def metric(port: int, line_start: str) -> float:
    reply = request(port, "GET", "/metrics", headers=AUTH)
    assert reply.status == 200
    text = reply.body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_a_dropped_stream_reattached_with_last_event_id_gets_the_rest_live(server, path, body):
    head, first = start_and_drop(server.port, path, body, {**RESUMABLE, **auth()}, at_least=5)
    stream_id = head.header(b"x-runnel-stream-id").decode()
    assert head.header(b"x-runnel-stream-url").decode() == f"{path}/{stream_id}/stream"
    assert {chunk["id"] for _, chunk in first} == {stream_id}  # the chunks carry the stream's id
    last = first[-1][0]
    chunks = reattach_chunks(server.port, f"{path}/{stream_id}/stream", auth(), last)
    # Followed live: the rest came in bursts as generated (a replay of a finished run is one write).
    assert len(chunks) > 3
    rest = parse_events(b"".join(chunks))
    assert rest[-1] == (None, "[DONE]")
    ids = [event_id for event_id, _ in first + rest[:-1]]
    assert ids == list(range(len(ids)))  # no gap, no duplicate
    assert text_of(first + rest) == EXPECTED
    assert rest[-2][1]["choices"][0]["finish_reason"] == "length"


def test_the_concatenation_equals_an_uninterrupted_stream(server):
    whole = request(server.port, "POST", "/v1/chat/completions", headers=AUTH, body=orjson.dumps(CHAT))
    assert whole.status == 200
    plain = [orjson.loads(line[6:]) for line in whole.body.split(b"\n\n") if line.startswith(b"data: {")]
    runs_before = metric(server.port, "runnel_runs_accepted_total")
    head, first = start_and_drop(server.port, "/v1/chat/completions", CHAT, {**RESUMABLE, **auth()}, at_least=3)
    assert metric(server.port, "runnel_runs_accepted_total") == runs_before + 1  # a resumable stream is a run
    stream_id = head.header(b"x-runnel-stream-id").decode()
    rest = parse_events(reattach(server.port, f"/v1/chat/completions/{stream_id}/stream", auth(), first[-1][0]).body)
    resumed = [chunk for _, chunk in first + rest[:-1]]

    def same(chunk: dict) -> dict:
        return {key: value for key, value in chunk.items() if key not in ("id", "created")}

    assert [same(chunk) for chunk in resumed] == [same(chunk) for chunk in plain]


def test_a_reattach_after_the_end_replays_everything_or_the_rest(server):
    head, first = start_and_drop(server.port, "/v1/chat/completions", CHAT, {**RESUMABLE, **auth()}, at_least=1)
    stream_id = head.header(b"x-runnel-stream-id").decode()
    path = f"/v1/chat/completions/{stream_id}/stream"

    def ended() -> bool:
        return reattach(server.port, path, auth(), WORDS).body.endswith(b"data: [DONE]\n\n")
    wait_until(ended, timeout=30)
    everything = parse_events(reattach(server.port, path, auth()).body)
    assert [event_id for event_id, _ in everything[:-1]] == list(range(len(everything) - 1))
    assert text_of(everything) == EXPECTED
    last = everything[-2][0]
    assert parse_events(reattach(server.port, path, auth(), last).body) == [(None, "[DONE]")]
    assert parse_events(reattach(server.port, f"{path}?starting_after={last - 1}", auth()).body) == everything[-2:]


def test_only_its_owner_can_reattach(server):
    head, _ = start_and_drop(server.port, "/v1/chat/completions", CHAT, {**RESUMABLE, **auth()}, at_least=1)
    stream_id = head.header(b"x-runnel-stream-id").decode()
    other = reattach(server.port, f"/v1/chat/completions/{stream_id}/stream", auth(KEYS[1]))
    assert other.status == 404 and other.json()["error"]["code"] == "stream_not_found"
    # nor through the other route, nor a made-up id
    assert reattach(server.port, f"/v1/completions/{stream_id}/stream", auth()).status == 404
    assert reattach(server.port, "/v1/chat/completions/chatcmpl-nope/stream", auth()).status == 404
    bad = reattach(server.port, f"/v1/chat/completions/{stream_id}/stream", auth(), -5)
    assert bad.status == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    wait_until(lambda: reattach(server.port, f"/v1/chat/completions/{stream_id}/stream", auth(), WORDS)
               .body.endswith(b"[DONE]\n\n"), timeout=30)  # let it end: the next test needs the slot


def test_a_deleted_stream_stops_generating_and_is_gone(server):
    head, first = start_and_drop(server.port, "/v1/completions", {**COMPLETION, "max_tokens": 2000},
                                 {**RESUMABLE, **auth()}, at_least=2)
    stream_id = head.header(b"x-runnel-stream-id").decode()
    url = f"/v1/completions/{stream_id}/stream"
    assert request(server.port, "DELETE", url, headers=((b"authorization", f"Bearer {KEYS[1]}".encode()),)
                   ).status == 404  # not the other principal's to delete
    assert request(server.port, "DELETE", f"/v1/chat/completions/{stream_id}/stream", headers=AUTH).status == 404
    deleted = request(server.port, "DELETE", url, headers=AUTH)
    assert deleted.status == 200 and deleted.json() == {"id": stream_id, "object": "stream.deleted", "deleted": True}
    assert reattach(server.port, url, auth()).status == 404
    assert request(server.port, "DELETE", url, headers=AUTH).status == 404
    # The generation stopped: echo's only slot takes a new request at once (2000 tokens at
    # 10 ms would hold it 20 s).
    short = orjson.dumps({**COMPLETION, "stream": False, "max_tokens": 2})
    wait_until(lambda: request(server.port, "POST", "/v1/completions", headers=AUTH, body=short).status == 200,
               timeout=5)


def test_a_refused_resumable_stream_is_answered_with_the_refusal_status(server):
    sock = connect(server.port)
    try:
        send_post(sock, "/v1/completions", {**COMPLETION, "max_tokens": 400}, headers=auth())
        head = read_head(sock)
        assert head.status == 200
        head.next_chunk()  # generating: echo's only slot is taken
        refused = request(server.port, "POST", "/v1/completions",
                          headers=((b"x-runnel-resumable", b"true"), *AUTH),
                          body=orjson.dumps(COMPLETION))
        assert refused.status == 429 and refused.json()["error"]["code"] == "queue_full"
        runs_before = metric(server.port, "runnel_runs_accepted_total")
        bad = request(server.port, "POST", "/v1/completions",
                      headers=((b"x-runnel-resumable", b"maybe"), *AUTH),
                      body=orjson.dumps(COMPLETION))
        assert bad.status == 400
        # a body refused by validation makes no run: it is checked before the run is made
        invalid = request(server.port, "POST", "/v1/completions", headers=((b"x-runnel-resumable", b"true"), *AUTH),
                          body=orjson.dumps({**COMPLETION, "max_tokens": -1}))
        assert invalid.status == 400 and invalid.json()["error"]["param"] == "max_tokens"
        assert metric(server.port, "runnel_runs_accepted_total") == runs_before
    finally:
        sock.close()


def test_without_the_header_a_disconnect_still_cancels_the_generation(server):
    gone = 'runnel_generation_requests_total{app="echo",finish_reason="cancelled"}'
    before = metric(server.port, gone)
    runs_before = metric(server.port, "runnel_runs_accepted_total")
    start_and_drop(server.port, "/v1/completions", {**COMPLETION, "max_tokens": 2000}, auth(), at_least=3)
    wait_until(lambda: metric(server.port, gone) == before + 1, timeout=10)
    assert metric(server.port, "runnel_runs_accepted_total") == runs_before  # no run was made
    # and the slot is free again at once: the generation stopped
    short = orjson.dumps({**COMPLETION, "stream": False, "max_tokens": 2})
    wait_until(lambda: request(server.port, "POST", "/v1/completions", headers=AUTH, body=short).status == 200,
               timeout=5)


def test_a_reader_that_stops_reading_holds_back_only_itself(start_server):
    """The run goes on while a client reads nothing; when it reads again it gets every event,
    written a slice at a time as it drains: never the whole backlog at once, which would
    pass max_stream_buffer_bytes and drop the client."""
    server = start_server({"server": {"runs_path": "", "max_stream_buffer_bytes": 512 * 1024},
                           "apps": {"echo": {"backend": "echo"}}})
    words = [f"{n:02d}" + "x" * 4000 for n in range(10)]
    tokens = 2500  # ~10 MB of events
    body = {"model": "echo", "prompt": " ".join(words), "max_tokens": tokens, "ignore_eos": True, "stream": True}
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    slow.settimeout(30)
    slow.connect(("127.0.0.1", server.port))
    with slow:
        send_post(slow, "/v1/completions", body, headers=RESUMABLE)
        head = read_head(slow)
        assert head.status == 200
        path = f"/v1/completions/{head.header(b'x-runnel-stream-id').decode()}/stream"
        # Reattached past any event, a request answers only once the run has ended.
        ended = reattach(server.port, path, {}, 10**9)
        assert parse_events(ended.body) == [(None, "[DONE]")]
        events = parse_events(b"".join(head.read_chunks()))
    assert events[-1] == (None, "[DONE]")
    assert [event_id for event_id, _ in events[:-1]] == list(range(len(events) - 1))
    cycle = [words[0], *(" " + word for word in words[1:])]  # echo's tokens, over and over
    expected = "".join(cycle[i % len(cycle)] for i in range(tokens))
    assert text_of(events) == expected


def test_a_finished_stream_replays_after_a_restart(tmp_path):
    config = server_config(echo_config(runs_path=str(tmp_path / "runs.sqlite3")))
    first = ServerThread(config).start()
    try:
        assert first.wait_ready()
        head, _ = start_and_drop(first.port, "/v1/completions", COMPLETION, {**RESUMABLE, **auth()}, at_least=2)
        stream_id = head.header(b"x-runnel-stream-id").decode()
        path = f"/v1/completions/{stream_id}/stream"
        wait_until(lambda: reattach(first.port, path, auth(), WORDS).body.endswith(b"[DONE]\n\n"), timeout=30)
    finally:
        first.stop()
    second = ServerThread(server_config(echo_config(runs_path=str(tmp_path / "runs.sqlite3")))).start()
    try:
        assert second.wait_ready()
        replayed = parse_events(reattach(second.port, path, auth()).body)
        assert text_of(replayed) == EXPECTED and replayed[-1] == (None, "[DONE]")
    finally:
        second.stop()


def test_background_responses_stream_and_resume_with_the_sdk(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[0], max_retries=0)
    words = " ".join(str(n) for n in range(60))
    seen = []
    response_id = None
    stream = client.responses.create(model="echo", input=words, background=True, stream=True, max_output_tokens=60)
    for event in stream:
        seen.append(event)
        if event.type == "response.created":
            response_id = event.response.id
        if event.type == "response.output_text.delta" and len(seen) >= 8:
            break
    stream.close()
    assert response_id is not None
    cursor = seen[-1].sequence_number
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=cursor))
    numbers = [event.sequence_number for event in seen + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type in ("response.completed", "response.incomplete")
    text = "".join(event.delta for event in seen + rest if event.type == "response.output_text.delta")
    final = client.responses.retrieve(response_id)
    assert final.status == rest[-1].response.status and final.output_text == text
    assert text.startswith("0 1 2")
    # only a streamed background response streams; and it is its owner's only
    plain = client.responses.create(model="echo", input="a b", max_output_tokens=3)
    with pytest.raises(openai.BadRequestError):
        list(client.responses.retrieve(plain.id, stream=True))
    other = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        list(other.responses.retrieve(response_id, stream=True, starting_after=0))


def test_on_redis_a_stream_is_reattached_through_another_server(tmp_path, redis_url):
    config = tmp_path / "runnel.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        runs = "{redis_url}"
        runs_lease = 2

        [apps.echo]
        backend = "echo"
        pace_ms = 10
    """))
    servers = [ServeProcess(tmp_path, config, f"server{n}") for n in range(2)]
    try:
        for started in servers:
            wait_until(started.ready, timeout=30)
        first, second = servers
        head, seen = start_and_drop(first.port, "/v1/chat/completions", CHAT, RESUMABLE, at_least=4)
        stream_id = head.header(b"x-runnel-stream-id").decode()
        path = f"/v1/chat/completions/{stream_id}/stream"
        chunks = reattach_chunks(second.port, path, {}, seen[-1][0])
        assert len(chunks) > 3  # followed live, from the store's copy of the values
        rest = parse_events(b"".join(chunks))
        ids = [event_id for event_id, _ in seen + rest[:-1]]
        assert ids == list(range(len(ids))) and rest[-1] == (None, "[DONE]")
        assert text_of(seen + rest) == EXPECTED
        # after the end, on either server, all of it
        for server in servers:
            assert text_of(parse_events(reattach(server.port, path, {}).body)) == EXPECTED
    finally:
        for started in servers:
            started.kill()
