"""Stream framings (SSE, NDJSON), Accept parsing and serializer negotiation."""

from __future__ import annotations

import pytest

from runnel.serializers import NDJSON, Negotiator, ServerSentEvents, parse_accept

SSE = ServerSentEvents()
ND = NDJSON()


class FakeRequest:
    """Just enough of Request for the Negotiator: header() by lower-case name."""

    def __init__(self, *headers: tuple[bytes, bytes]) -> None:
        self.headers = list(headers)

    def header(self, name: bytes, default=None):
        for key, value in self.headers:
            if key == name:
                return value
        return default


def accept(value: bytes) -> FakeRequest:
    return FakeRequest((b"accept", value))


# --- Server-Sent Events ------------------------------------------------------------


def test_sse_media_type():
    assert SSE.media_type == b"text/event-stream"


def test_sse_str():
    assert SSE.encode("hello") == b"data: hello\n\n"
    assert SSE.encode("") == b"data: \n\n"
    assert SSE.encode("[DONE]") == b"data: [DONE]\n\n"


def test_sse_str_is_utf8():
    assert SSE.encode("café ☕") == "data: café ☕\n\n".encode()


@pytest.mark.parametrize(
    ("text", "framed"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\n\nb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n", b"data: a\ndata: \n\n"),
        ("\r\n", b"data: \ndata: \n\n"),
        ("one\r\ntwo\nthree\rfour", b"data: one\ndata: two\ndata: three\ndata: four\n\n"),
    ],
)
def test_sse_multi_line_str_is_one_data_line_per_line(text, framed):
    assert SSE.encode(text) == framed


def test_sse_str_subclass_is_a_str():
    class Name(str):
        pass

    assert SSE.encode(Name("x")) == b"data: x\n\n"


def test_sse_bytes_go_as_they_are():
    assert SSE.encode(b'{"pre":"encoded"}') == b'data: {"pre":"encoded"}\n\n'
    assert SSE.encode(b"") == b"data: \n\n"


def test_sse_objects_are_json():
    assert SSE.encode({"a": 1}) == b'data: {"a":1}\n\n'
    assert SSE.encode({"text": "line\nbreak"}) == b'data: {"text":"line\\nbreak"}\n\n'
    assert SSE.encode([1, "two", None]) == b'data: [1,"two",null]\n\n'
    assert SSE.encode(3) == b"data: 3\n\n"
    assert SSE.encode(None) == b"data: null\n\n"


def test_sse_error_event():
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert SSE.encode_error(error) == (
        b'event: error\ndata: {"error":{"message":"boom","type":"server_error","param":null,"code":null}}\n\n'
    )


# --- NDJSON ------------------------------------------------------------------------


def test_ndjson_media_type():
    assert ND.media_type == b"application/x-ndjson"


def test_ndjson_objects_one_per_line():
    assert ND.encode({"a": 1}) == b'{"a":1}\n'
    assert ND.encode({"text": "x\ny"}) == b'{"text":"x\\ny"}\n'
    assert ND.encode([1, 2]) == b"[1,2]\n"
    assert ND.encode(None) == b"null\n"


def test_ndjson_str_is_a_json_string():
    assert ND.encode("hi") == b'"hi"\n'
    assert ND.encode("a\nb") == b'"a\\nb"\n'


def test_ndjson_bytes_go_as_they_are():
    assert ND.encode(b'{"pre":1}') == b'{"pre":1}\n'


def test_ndjson_error():
    assert ND.encode_error({"error": {"message": "x"}}) == b'{"error":{"message":"x"}}\n'


# --- parse_accept --------------------------------------------------------------------


def test_parse_accept_single():
    assert parse_accept(b"text/event-stream") == [(1.0, "text/event-stream")]


def test_parse_accept_orders_by_quality_then_position():
    value = b"text/plain;q=0.5, application/x-ndjson, text/event-stream;q=0.9, */*;q=0.1, application/json"
    assert parse_accept(value) == [
        (1.0, "application/x-ndjson"),
        (1.0, "application/json"),
        (0.9, "text/event-stream"),
        (0.5, "text/plain"),
        (0.1, "*/*"),
    ]


def test_parse_accept_lower_cases_and_strips_and_ignores_other_params():
    value = b" Text/Event-Stream ; charset=utf-8 ;Q=0.7 ,APPLICATION/X-NDJSON;level=1"
    assert parse_accept(value) == [(1.0, "application/x-ndjson"), (0.7, "text/event-stream")]


def test_parse_accept_skips_empty_ranges():
    assert parse_accept(b", ,text/plain,,") == [(1.0, "text/plain")]
    assert parse_accept(b"") == []


def test_parse_accept_invalid_q_is_zero():
    assert parse_accept(b"a/b;q=oops, c/d") == [(1.0, "c/d"), (0.0, "a/b")]


def test_parse_accept_q_zero_is_kept_last():
    assert parse_accept(b"a/b;q=0, c/d;q=0.001") == [(0.001, "c/d"), (0.0, "a/b")]


# --- Negotiator ----------------------------------------------------------------------------


@pytest.fixture
def negotiate() -> Negotiator:
    return Negotiator({b"text/event-stream": SSE, b"application/x-ndjson": ND})


def test_negotiator_default_without_accept(negotiate):
    assert negotiate(FakeRequest()) is SSE
    assert negotiate(accept(b"")) is SSE


def test_negotiator_default_on_wildcards(negotiate):
    assert negotiate(accept(b"*/*")) is SSE
    assert negotiate(accept(b"text/*")) is SSE


def test_negotiator_default_on_unknown(negotiate):
    assert negotiate(accept(b"application/xml")) is SSE
    assert negotiate(accept(b"image/png, audio/ogg;q=0.5")) is SSE


def test_negotiator_picks_what_accept_names(negotiate):
    assert negotiate(accept(b"application/x-ndjson")) is ND
    assert negotiate(accept(b"text/event-stream")) is SSE
    assert negotiate(accept(b"Application/X-NDJSON; charset=utf-8")) is ND


def test_negotiator_honours_q_values(negotiate):
    assert negotiate(accept(b"text/event-stream;q=0.5, application/x-ndjson")) is ND
    assert negotiate(accept(b"application/x-ndjson;q=0.2, text/event-stream;q=0.8")) is SSE
    assert negotiate(accept(b"application/json, application/x-ndjson;q=0.9, */*;q=0.1")) is ND


def test_negotiator_first_listed_wins_a_tie(negotiate):
    assert negotiate(accept(b"application/x-ndjson, text/event-stream")) is ND
    assert negotiate(accept(b"text/event-stream, application/x-ndjson")) is SSE


def test_negotiator_skips_refused_types(negotiate):
    assert negotiate(accept(b"application/x-ndjson;q=0, */*")) is SSE
    assert negotiate(accept(b"text/event-stream;q=0, application/x-ndjson;q=0.1")) is ND


def test_negotiator_a_named_type_beats_a_wildcard_listed_before_it_at_lower_q(negotiate):
    assert negotiate(accept(b"*/*;q=0.1, application/x-ndjson")) is ND


def test_negotiator_with_another_default():
    negotiate = Negotiator({b"text/event-stream": SSE, b"application/x-ndjson": ND}, default=b"application/x-ndjson")
    assert negotiate(FakeRequest()) is ND
    assert negotiate(accept(b"*/*")) is ND
    assert negotiate(accept(b"text/event-stream")) is SSE


def test_negotiator_default_must_be_registered():
    with pytest.raises(KeyError):
        Negotiator({b"application/x-ndjson": ND})


def test_wants_is_explicit_only(negotiate):
    assert negotiate.wants(accept(b"text/event-stream"), b"text/event-stream")
    assert negotiate.wants(accept(b"application/json, Text/Event-Stream;q=0.3"), b"text/event-stream")
    assert not negotiate.wants(accept(b"*/*"), b"text/event-stream")
    assert not negotiate.wants(accept(b"text/event-stream;q=0"), b"text/event-stream")
    assert not negotiate.wants(FakeRequest(), b"text/event-stream")


# --- the stream's fast path for encoded payloads ----------------------------------------


@pytest.mark.parametrize("serializer", [SSE, ND], ids=["sse", "ndjson"])
def test_payload_frame_is_what_encode_does_with_bytes(serializer):
    # ResponseStream.send frames bytes with payload_frame in one step instead of encode():
    # both must give the same bytes, or the per-token path would frame differently.
    prefix, suffix = serializer.payload_frame
    for payload in (b'{"a":1}', b"", b'"text"'):
        assert prefix + payload + suffix == serializer.encode(payload)
