"""The test harness's own reader of raw HTTP responses (runnel.testing), on bytes and on sockets.

Every end-to-end test trusts it to see exactly what the server framed, so it is checked
here against responses written by hand.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from runnel.testing import (
    ResponseReader,
    assert_error,
    error_body,
    free_port,
    parse_all,
    parse_response,
    read_head,
    sse_events,
)

JSON_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}"
CHUNKED_WIRE = b"5\r\nhello\r\n1\r\n \r\nc\r\nworld, again\r\n0\r\n\r\n"
CHUNKED_200 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_WIRE


# -- heads ----------------------------------------------------------------------------------


def test_head_fields_are_parsed_in_wire_order_with_lower_case_names():
    data = b"HTTP/1.1 404 Not Found\r\nX-B: 2\r\nx-a:\t one \r\nContent-Length: 0\r\n\r\n"
    response, end = parse_response(data + b"next")
    assert (response.version, response.status, response.reason) == (b"HTTP/1.1", 404, b"Not Found")
    assert response.status_line == b"HTTP/1.1 404 Not Found"
    assert response.header_list == [(b"x-b", b"2"), (b"x-a", b"one"), (b"content-length", b"0")]
    assert response.headers == {b"x-b": b"2", b"x-a": b"one", b"content-length": b"0"}
    assert response.header(b"x-a") == b"one" and response.header(b"absent") is None
    assert (response.body, response.ended, end) == (b"", True, len(data))


def test_a_status_line_without_a_reason_parses():
    [response] = parse_all(b"HTTP/1.1 299\r\nContent-Length: 0\r\n\r\n")
    assert (response.status, response.reason) == (299, b"")


def test_a_header_sent_twice_is_reported_by_header_and_kept_by_values():
    [response] = parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nVary: a\r\nVary: b\r\n\r\n")
    assert response.values(b"vary") == [b"a", b"b"]
    with pytest.raises(AssertionError, match="sent 2 times"):
        response.header(b"vary")


@pytest.mark.parametrize("line", [b"No colon here", b"Space : before colon", b": no name"])
def test_a_malformed_header_line_fails(line):
    with pytest.raises(AssertionError, match="malformed header line"):
        parse_all(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")


def test_connection_close_is_seen():
    [response] = parse_all(b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n")
    assert response.closes
    [response] = parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not response.closes


# -- bodies ---------------------------------------------------------------------------------


def test_content_length_body_is_exactly_that_long():
    response, end = parse_response(JSON_200 + b"HTTP/1.1 ...")
    assert response.body == response.wire_body == b'{"a": true}'
    assert response.json() == {"a": True}
    assert end == len(JSON_200)


def test_chunked_body_keeps_each_chunk_and_the_exact_wire_bytes():
    [response] = parse_all(CHUNKED_200)
    assert response.chunks == [b"hello", b" ", b"world, again"]
    assert response.body == b"hello world, again"
    assert response.wire_body == CHUNKED_WIRE
    assert response.ended


@pytest.mark.parametrize("wire, message", [
    (b"5;ext=1\r\nhello\r\n0\r\n\r\n", "bad chunk size line"),  # runnel sends no extensions
    (b"5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", "trailers or garbage after the last chunk"),
    (b"5\r\nhelloXX0\r\n\r\n", "chunk not followed by CRLF"),
    (b"zz\r\n", "bad chunk size line"),
])
def test_chunked_framing_errors_fail(wire, message):
    with pytest.raises(AssertionError, match=message):
        parse_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)


def test_a_body_framed_by_neither_runs_to_the_close():
    [response] = parse_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of\r\n\r\nthis")
    assert response.body == response.wire_body == b"all of\r\n\r\nthis"
    assert response.ended


@pytest.mark.parametrize("data, what", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", "the end of a response head"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "the end of the body"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "the end of a chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "a chunk size line"),
])
def test_a_truncated_response_fails_naming_what_was_missing(data, what):
    with pytest.raises(ConnectionError, match=f"closed before {what}"):
        parse_all(data)


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body_whatever_their_headers_say(status):
    data = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status + JSON_200
    first, second = parse_all(data)
    assert (first.status, first.body, first.ended) == (status, b"", True)
    assert second.json() == {"a": True}


def test_an_interim_response_has_no_body_and_the_final_one_follows():
    interim, final = parse_all(b"HTTP/1.1 100 Continue\r\n\r\n" + JSON_200)
    assert (interim.status, interim.body) == (100, b"")
    assert final.status == 200


def test_a_head_response_has_no_body_only_where_the_caller_says_so():
    head_reply = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
    head, get = parse_all(head_reply + JSON_200, heads=(0,))
    assert (head.header(b"content-length"), head.body) == (b"11", b"")
    assert get.json() == {"a": True}
    # Read as the answer to a GET, the same bytes are a truncated body instead.
    with pytest.raises(ConnectionError):
        parse_all(head_reply)


def test_pipelined_responses_in_one_byte_string_come_apart_in_order():
    data = JSON_200 + CHUNKED_200 + b"HTTP/1.1 204 No Content\r\n\r\n" + JSON_200
    responses = parse_all(data)
    assert [r.status for r in responses] == [200, 200, 204, 200]
    assert [r.body for r in responses] == [b'{"a": true}', b"hello world, again", b"", b'{"a": true}']
    # parse_response walks the same string one response at a time.
    pos, bodies = 0, []
    while pos < len(data):
        response, pos = parse_response(data, pos)
        bodies.append(response.body)
    assert bodies == [r.body for r in responses]
    assert parse_all(b"") == []


# -- off a live socket ----------------------------------------------------------------------


def trickle(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` a byte at a time, then close: every read sees a partial message."""
    def send():
        with sock:
            for i in range(len(data)):
                sock.sendall(data[i : i + 1])

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_socket_read_byte_by_byte_gives_the_same_responses_as_the_bytes():
    data = JSON_200 + CHUNKED_200 + b"HTTP/1.1 200 OK\r\n\r\nto the close"
    ours, theirs = socket.socketpair()
    with ours:
        ours.settimeout(10)
        sender = trickle(theirs, data)
        reader = ResponseReader(ours)
        responses = []
        while not reader.at_end():
            responses.append(reader.read_response())
        sender.join(10)
    assert [(r.status, r.header_list, r.body, r.wire_body, r.chunks) for r in responses] == [
        (r.status, r.header_list, r.body, r.wire_body, r.chunks) for r in parse_all(data)]


def test_chunks_are_read_one_at_a_time_as_they_arrive():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(10)
        theirs.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        response = read_head(ours)
        assert response.status == 200 and not response.ended
        assert response.next_chunk() == b"hello"
        theirs.sendall(b"1\r\n!\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        assert response.next_chunk() == b"!"
        assert response.next_chunk() is None
        assert response.next_chunk() is None  # the end stays the end
        assert (response.body, response.ended) == (b"hello!", True)
        # What came after the body waits for the next read.
        assert response.reader.pending == b"HTTP/1.1 204 No Content\r\n\r\n"
        assert response.reader.read_response().status == 204


# -- SSE bodies, error envelopes, ports -------------------------------------------------------


def test_sse_events_are_the_data_payloads():
    assert sse_events(b'data: {"n":1}\n\ndata: [DONE]\n\n') == [b'{"n":1}', b"[DONE]"]


@pytest.mark.parametrize("body", [
    b"data: one\n\ndata: two\n",  # not ended by a blank line
    b"event: error\ndata: x\n\n",  # not a bare data line
    b"data: a\ndata: b\n\n",  # two lines in one event
    b"data: a\r\n\r\n",
])
def test_sse_events_refuse_anything_but_one_data_line_per_event(body):
    with pytest.raises(AssertionError):
        sse_events(body)


def test_error_body_is_the_envelope_in_the_servers_key_order():
    assert list(error_body("m", "t", "c", "p")["error"].items()) == [
        ("message", "m"), ("type", "t"), ("param", "p"), ("code", "c")]


def test_assert_error_checks_status_type_param_and_code():
    body = b'{"error":{"message":"no","type":"invalid_request_error","param":"n","code":"bad"}}'
    [response] = parse_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    assert assert_error(response, 400, "n", "bad")["message"] == "no"
    for wrong in ({"status": 404}, {"param": None}, {"code": "other"}, {"type_": "server_error"}):
        with pytest.raises(AssertionError):
            assert_error(response, **{"status": 400, "param": "n", "code": "bad", **wrong})


def test_free_port_is_free():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_importing_runnel_or_its_harness_does_not_import_pytest():
    code = ("import sys, runnel, runnel.cli, runnel.testing; "
            "assert 'pytest' not in sys.modules, 'pytest imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
