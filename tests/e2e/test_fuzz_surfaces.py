"""Issue 10: a fuzz test of the JSON surfaces, against a real server.

Bodies mix valid shapes with wrong types, huge and tiny numbers, deep nesting and
unicode (JSON has no NaN or infinity: orjson refuses them, so what a client can send
is a huge exponent, which arrives as a parse error, or a literal ``NaN`` token, which
is not JSON). Whatever arrives: no 5xx from the server's own code (a python function
that raises on a wrong argument is the function's 500, ``function_error``), every
error body in its surface's shape, and /health still answers afterwards.

Bounded (``max_examples``) so the whole module takes seconds; derandomized so CI
sees the same examples every run.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runnel.testing import ServerThread, request, server_config

REPO_HELLO = "examples/hello/main.py"

# -- values: valid-looking, wrong-typed, extreme --------------------------------------
_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-300, -1e-300, 5e-324, 1e300, -1e308, 0.0, -0.0, 0.5, 2.0000001]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=40))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_messages = st.one_of(
    st.just([{"role": "user", "content": "lorem ipsum dolor sit amet"}]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", 3]),
                                    "content": st.one_of(st.text(max_size=60), _json)}), max_size=3),
    _json,
)
_stop = st.one_of(st.none(), st.text(max_size=8), st.lists(st.text(max_size=8), max_size=6), _json)
_sampling = {
    "max_tokens": _numbers, "max_completion_tokens": _numbers, "temperature": _numbers, "top_p": _numbers,
    "top_k": _numbers, "n": _numbers, "seed": _numbers, "stop": _stop, "stop_token_ids": st.one_of(
        st.lists(_numbers, max_size=4), _json), "logprobs": st.one_of(st.booleans(), _numbers),
    "top_logprobs": _numbers, "presence_penalty": _numbers, "frequency_penalty": _numbers,
    "repetition_penalty": _numbers, "no_repeat_ngram_size": _numbers, "min_tokens": _numbers,
    "ignore_eos": st.one_of(st.booleans(), _json), "stream": st.one_of(st.booleans(), _json),
    "stream_options": st.one_of(st.just({"include_usage": True}), _json), "echo": st.one_of(st.booleans(), _json),
    "user": _scalars, "response_format": _json, "tools": _json,
}


# Mostly plausible values, so that many requests get through to a generation.
_plausible = {
    "max_tokens": st.integers(1, 40), "temperature": st.floats(0, 2), "top_p": st.floats(1e-6, 1),
    "top_k": st.integers(-1, 50), "n": st.integers(1, 3), "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(alphabet=" abcdelorempsum", min_size=1, max_size=6), max_size=4),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=3), "logprobs": st.booleans(),
    "min_tokens": st.integers(0, 5), "ignore_eos": st.booleans(), "stream": st.booleans(),
}
_extra = st.lists(st.one_of(*[st.tuples(st.just(name), st.one_of(_plausible[name], value) if name in _plausible
                                        else value) for name, value in _sampling.items()]), max_size=4)


def _body(required: dict) -> st.SearchStrategy:
    return st.builds(lambda body, extra: {**body, **dict(extra)}, st.fixed_dictionaries(required), _extra)


_chat = _body({"model": st.sampled_from(["echo", "echo", "nope", 7]), "messages": _messages})
_completion = _body({"model": st.sampled_from(["echo", "echo", "nope"]),
                     "prompt": st.one_of(st.just("lorem ipsum dolor"), st.text(max_size=60), st.lists(st.text(max_size=20), max_size=3), _json)})
_embeddings = st.fixed_dictionaries({"input": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=4),
                                                        _json)},
                                    optional={"model": st.sampled_from(["echo", "nope", None]),
                                              "encoding_format": st.sampled_from(["float", "base64", "x", 1]),
                                              "dimensions": _scalars})
_function_args = st.dictionaries(st.sampled_from(["name", "punctuation", "a", "b", "note", "run_id", "x"]), _json,
                                 max_size=3)
_baseten = st.one_of(_json, st.fixed_dictionaries({"model_id": st.sampled_from(["bz", "none", 1]),},
                                                  optional={"deployment_id": st.one_of(st.text(max_size=8), _json)}))

# (path, body strategy, surface)
_REQUESTS = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), _chat, st.just("openai")),
    st.tuples(st.just("/v1/completions"), _completion, st.just("openai")),
    st.tuples(st.just("/v1/embeddings"), _embeddings, st.just("openai")),
    st.tuples(st.just("/v2/echo/openai/v1/chat/completions"), _chat, st.just("openai")),
    st.tuples(st.just("/v2/echo/openai/v1/completions"), _completion, st.just("openai")),
    st.tuples(st.just("/v1/direct/chat/completions"),
              st.builds(lambda body, target: {**body, "baseten": target}, _chat, _baseten), st.just("openai")),
    st.tuples(st.sampled_from(["/v4/p-local/hello/greet", "/v4/p-local/hello/add", "/v4/p-local/hello/whoami",
                               "/v4/p-local/hello/nope", "/v4/p-local/nope/greet"]),
              st.one_of(_function_args, _json), st.just("functions")),
    st.tuples(st.sampled_from(["/v4/p-local/hello/run/chat/completions", "/v4/p-local/echo/x/chat/completions"]),
              _chat, st.just("functions")),
    st.tuples(st.sampled_from(["/v4/p-local/echo/x/embeddings"]), _embeddings, st.just("functions")),
    st.tuples(st.sampled_from(["/v2/hello/run", "/v2/hello/runsync"]),
              st.one_of(st.fixed_dictionaries({"input": st.one_of(_function_args, _json)},
                                              optional={"policy": _json, "webhook": _scalars}), _json),
              st.just("runpod")),
)
# Not JSON at all, or JSON no parser takes: a parse error in each surface's shape.
_RAW = st.sampled_from([b"", b"{", b"NaN", b'{"max_tokens": NaN}', b'{"temperature": 1e999}', b"[" * 5000,
                        b'{"a": "\xff"}', b"null", b"1e400", b'"' + b"x" * 100 + b'"'])


def _check_shape(surface: str, status: int, body: dict) -> None:
    if surface == "runpod":
        assert list(body) == ["error"] and type(body["error"]) is str, body
        return
    error = body["error"]
    assert sorted(error) == ["code", "message", "param", "type"], body
    assert type(error["message"]) is str and error["message"], body
    if surface == "functions":
        assert sorted(body) == ["error", "run_id"] and type(body["run_id"]) is str, body
    else:
        assert list(body) == ["error"], body


@pytest.fixture(scope="module")
def fuzzed():
    config = {
        "server": {"runs_path": "", "runsync_timeout": 2.0},
        "apps": {
            "echo": {"backend": "echo", "context_length": 256, "baseten": {"model_id": "bz"}},
            "hello": {"backend": "python", "module": REPO_HELLO, "runpod": {"handler": "greet"}},
        },
    }
    server = ServerThread(server_config(config)).start()
    assert server.wait_ready()
    yield server
    server.stop()


def _send(server, path: str, payload: bytes):
    return request(server.port, "POST", path, headers=[("content-type", "application/json")], body=payload)


def _assert_answer(path: str, surface: str, reply) -> None:
    status = reply.status
    if status < 400:
        # A stream that failed after it started ends with an error event: never the server's own.
        assert b"internal_error" not in reply.body, (path, reply.body[-300:])
        return
    body = json.loads(reply.body)
    _check_shape(surface, status, body)
    if status >= 500:
        # Only a python function's own exception may be a 500 (its code raised, not the server's).
        assert surface == "functions" and body["error"]["code"] == "function_error", (path, status, body)


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(fuzz_request=_REQUESTS)
def test_the_json_surfaces_never_fail_on_what_a_client_sends(fuzzed, fuzz_request):
    path, body, surface = fuzz_request
    payload = json.dumps(body).encode()  # stdlib: ints past 64 bits arrive as they would from any client
    reply = _send(fuzzed, path, payload)
    _assert_answer(path, surface, reply)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(payload=_RAW, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                           "/v4/p-local/hello/greet", "/v2/hello/run",
                                           "/v1/direct/chat/completions"]))
def test_bodies_that_are_not_json_are_400s_in_the_surfaces_shape(fuzzed, payload, path):
    surface = "runpod" if path.startswith("/v2/hello") else "functions" if path.startswith("/v4") else "openai"
    reply = _send(fuzzed, path, payload)
    _assert_answer(path, surface, reply)


def test_health_answers_after_the_fuzzing(fuzzed, tiny_server):
    assert request(tiny_server.port, "GET", "/health").status == 200
    assert request(fuzzed.port, "GET", "/health").status == 200
    reply = _send(fuzzed, "/v1/completions", json.dumps({"model": "echo", "prompt": "still here"}).encode())
    assert reply.status == 200 and json.loads(reply.body)["choices"][0]["text"] == "still here"


_NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "no_repeat_ngram_size",
            "min_tokens", "top_logprobs", "n"]
# One extreme value in an otherwise valid request: what reaches the model if a check is missing.
_extreme = st.tuples(st.sampled_from(_NUMERIC), st.one_of(
    st.sampled_from([2**31, 2**63 - 1, 2**64 - 1, 1e-300, 5e-324, 1e300, 513, 1001, 0, -1]), _numbers))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), extreme=_extreme,
       stream=st.booleans())
def test_a_real_model_never_fails_on_what_a_client_sends(tiny_server, path, extreme, stream):
    name, value = extreme
    body = {"model": "tiny", "max_tokens": 3, "stream": stream, name: value}
    if path == "/v1/completions":
        body["prompt"] = "The cat sees"
    else:
        body["messages"] = [{"role": "user", "content": "Hello!"}]
        body["logprobs"] = name == "top_logprobs"
    reply = _send(tiny_server, path, json.dumps(body).encode())
    _assert_answer(path, "openai", reply)
    assert b"generation_failed" not in reply.body, reply.body[-300:]  # a model's failure, streamed or not
